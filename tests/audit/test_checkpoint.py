"""C2SP tlog-checkpoint bodies and Ed25519 signed notes: format, interop vectors, strictness."""

from __future__ import annotations

import base64
from hashlib import sha256

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.audit.checkpoint import (
    MAX_NOTE_SIZE,
    MAX_SIGNATURES,
    Checkpoint,
    CheckpointError,
    NoteSigner,
    NoteVerifier,
    ed25519_key_id,
)
from broker.audit.merkle import root_from_leaves

ORIGIN = "broker.example/audit-log"
ROOT = root_from_leaves([b"one", b"two", b"three"])
DASH = "\u2014"

# Public vectors of golang.org/x/mod/sumdb/note (note_test.go, example_test.go), which the
# C2SP signed-note spec describes. Only public keys and signatures: no private key here.
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = (
    b"If you think cryptography is the answer to your problem,\n"
    b"then you don't know what your problem is.\n"
)
PETER_SIG = (
    f"{DASH} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngo"
    "tpRZb6KE6RyyBwJnAM=\n"
).encode()
ENOCH_SIG = (
    f"{DASH} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwn"
    "WLox33WWd1RvMc+QQ=\n"
).encode()

# The tlog-checkpoint spec's example body.
SPEC_BODY = b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(ORIGIN, Ed25519PrivateKey.generate())


@pytest.fixture
def verifier(signer: NoteSigner) -> NoteVerifier:
    return NoteVerifier.from_vkey(signer.verifier_key())


@pytest.fixture
def checkpoint() -> Checkpoint:
    return Checkpoint(ORIGIN, 3, ROOT)


def signature_lines(note: bytes) -> bytes:
    return note[note.rindex(b"\n\n") + 2 :]


# --- checkpoint bodies ----------------------------------------------------------------------------


def test_body_is_the_tlog_checkpoint_text() -> None:
    checkpoint = Checkpoint.parse(SPEC_BODY)
    assert checkpoint.origin == "example.com/behind-the-sofa"
    assert checkpoint.size == 20852163
    assert checkpoint.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert checkpoint.extensions == ()
    assert checkpoint.body() == SPEC_BODY


def test_body_round_trips_with_extensions() -> None:
    checkpoint = Checkpoint(ORIGIN, 0, ROOT, ("Timestamp: 1700000000", "x y+z \u00e9"))
    body = checkpoint.body()
    assert (
        body
        == (
            f"{ORIGIN}\n0\n{base64.b64encode(ROOT).decode()}\nTimestamp: 1700000000\nx y+z \u00e9\n"
        ).encode()
    )
    assert Checkpoint.parse(body) == checkpoint


ROOT_B64 = base64.b64encode(ROOT).decode()
URLSAFE_B64 = base64.urlsafe_b64encode(bytes([0xFF]) * 32).decode()  # "_" and "-"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (f"{ORIGIN}\n3\n{ROOT_B64}", "newline"),
        (f"{ORIGIN}\n3\n", "at least 3 lines"),
        (f"\n3\n{ROOT_B64}\n", "origin is empty"),
        (f"{ORIGIN}\n3\n{ROOT_B64}\n\n", "extension line 1 is empty"),
        (f"{ORIGIN}\n3\n{ROOT_B64}\next\n\nmore\n", "extension line 2 is empty"),
        (f"{ORIGIN}\n03\n{ROOT_B64}\n", "decimal"),
        (f"{ORIGIN}\n+3\n{ROOT_B64}\n", "decimal"),
        (f"{ORIGIN}\n-3\n{ROOT_B64}\n", "decimal"),
        (f"{ORIGIN}\n 3\n{ROOT_B64}\n", "decimal"),
        (f"{ORIGIN}\n1_0\n{ROOT_B64}\n", "decimal"),
        (f"{ORIGIN}\n\u0663\n{ROOT_B64}\n", "decimal"),  # Arabic-Indic digit three
        (f"{ORIGIN}\n\n{ROOT_B64}\n", "decimal"),
        (f"{ORIGIN}\n18446744073709551616\n{ROOT_B64}\n", "tree size"),
        (f"{ORIGIN}\n3\n{ROOT_B64.rstrip('=')}\n", "base64"),
        (f"{ORIGIN}\n3\n{ROOT_B64[:-2]}!=\n", "base64"),
        (f"{ORIGIN}\n3\n {ROOT_B64}\n", "base64"),
        (f"{ORIGIN}\n3\n{URLSAFE_B64}\n", "base64"),
        (f"{ORIGIN}\n3\n{base64.b64encode(ROOT[:31]).decode()}\n", "32 bytes"),
        (f"{ORIGIN}\n3\n\n", "32 bytes"),
        (f"{ORIGIN}\r\n3\r\n{ROOT_B64}\r\n", "control character"),
        (f"{ORIGIN}\t\n3\n{ROOT_B64}\n", "control character"),
    ],
)
def test_parse_rejects_malformed_bodies(body: str, reason: str) -> None:
    with pytest.raises(CheckpointError, match=reason):
        Checkpoint.parse(body.encode())


def test_parse_rejects_non_canonical_base64() -> None:
    # "...Yg==" and "...Yh==" decode to the same bytes; only the canonical form is accepted.
    canonical = base64.b64encode(ROOT).decode()
    assert canonical.endswith("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = canonical[-2]
    sibling = alphabet[alphabet.index(last) ^ 1]
    mangled = canonical[:-2] + sibling + "="
    assert base64.b64decode(mangled) == ROOT
    with pytest.raises(CheckpointError, match="canonical"):
        Checkpoint.parse(f"{ORIGIN}\n3\n{mangled}\n".encode())


def test_parse_rejects_invalid_utf8() -> None:
    with pytest.raises(CheckpointError, match="UTF-8"):
        Checkpoint.parse(b"\xff\n3\n" + ROOT_B64.encode() + b"\n")


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions", "reason"),
    [
        ("", 1, ROOT, (), "origin is empty"),
        ("a\nb", 1, ROOT, (), "control character"),
        (ORIGIN, -1, ROOT, (), "tree size"),
        (ORIGIN, 2**64, ROOT, (), "tree size"),
        (ORIGIN, True, ROOT, (), "tree size"),
        (ORIGIN, 1, ROOT[:16], (), "32 bytes"),
        (ORIGIN, 1, ROOT, ("",), "extension line 1 is empty"),
        (ORIGIN, 1, ROOT, ("ok", "two\nlines"), "extension line 2"),
    ],
)
def test_checkpoint_fields_are_validated(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(CheckpointError, match=reason):
        Checkpoint(origin, size, root, extensions)


# --- keys -----------------------------------------------------------------------------------------


def test_key_id_follows_the_spec_definition(signer: NoteSigner) -> None:
    expected = sha256(ORIGIN.encode() + b"\n\x01" + signer.raw_public_key).digest()[:4]
    assert signer.key_id == expected
    encoded = base64.b64encode(b"\x01" + signer.raw_public_key).decode()
    assert signer.verifier_key() == f"{ORIGIN}+{expected.hex()}+{encoded}"


def test_key_id_matches_go_sumdb_vector() -> None:
    name, hex_id, encoded = PETER_VKEY.split("+", 2)
    public_key = base64.b64decode(encoded)[1:]
    assert ed25519_key_id(name, public_key).hex() == hex_id == "c74f20a3"
    assert NoteVerifier.from_vkey(PETER_VKEY).key_id.hex() == "c74f20a3"


def test_signer_reproduces_go_sumdb_vector_byte_for_byte() -> None:
    # NOTE: EnochRoot's key in the Go example is derived from an all-zero seed (its zeroReader);
    # that seed is public by construction, so it is a test vector, not a committed secret.
    enoch = NoteSigner("EnochRoot", Ed25519PrivateKey.from_private_bytes(bytes(32)))
    assert enoch.verifier_key() == ENOCH_VKEY
    assert enoch.sign_text(GO_TEXT) == GO_TEXT + b"\n" + ENOCH_SIG


def test_verifier_accepts_go_sumdb_notes() -> None:
    peter = NoteVerifier.from_vkey(PETER_VKEY)
    enoch = NoteVerifier.from_vkey(ENOCH_VKEY)
    assert peter.verify_text(GO_TEXT + b"\n" + PETER_SIG) == GO_TEXT
    # A doubly signed note: each verifier ignores the other's signature.
    both = GO_TEXT + b"\n" + PETER_SIG + ENOCH_SIG
    assert peter.verify_text(both) == GO_TEXT
    assert enoch.verify_text(both) == GO_TEXT
    with pytest.raises(CheckpointError, match="no signature by key EnochRoot"):
        enoch.verify_text(GO_TEXT + b"\n" + PETER_SIG)
    with pytest.raises(CheckpointError, match="does not verify"):
        peter.verify_text(GO_TEXT.replace(b"cryptography", b"cryptographY") + b"\n" + PETER_SIG)
    # The text is a valid note but not a checkpoint.
    with pytest.raises(CheckpointError, match="at least 3 lines"):
        peter.verify(GO_TEXT + b"\n" + PETER_SIG)


def test_verifier_key_parsing_rejects_every_mangling() -> None:
    # After golang.org/x/mod/sumdb/note's TestNewVerifier: every proper substring and every
    # single-character change of a valid key must be rejected.
    NoteVerifier.from_vkey(PETER_VKEY)
    for i in range(len(PETER_VKEY)):
        for j in range(i + 1, len(PETER_VKEY) + 1):
            if (i, j) != (0, len(PETER_VKEY)):
                with pytest.raises(CheckpointError):
                    NoteVerifier.from_vkey(PETER_VKEY[i:j])
    for i, char in enumerate(PETER_VKEY):
        mangled = PETER_VKEY[:i] + chr(ord(char) + 1) + PETER_VKEY[i + 1 :]
        with pytest.raises(CheckpointError):
            NoteVerifier.from_vkey(mangled)


@pytest.mark.parametrize(
    ("vkey", "reason"),
    [
        ("PeterNeumann", "expected <name>"),
        ("PeterNeumann+c74f20a3", "expected <name>"),
        ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "key name"),
        ("+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "key name"),
        ("PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "lowercase hex"),
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "key id"),
        ("PeterNeumann+c74f20a3+Apc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "base64"),
        ("PeterNeumann+c74f20a3+AhpcWQcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "type 0x01"),
        ("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWAAAA", "type 0x01"),
    ],
)
def test_verifier_key_errors_say_why(vkey: str, reason: str) -> None:
    with pytest.raises(CheckpointError, match=reason):
        NoteVerifier.from_vkey(vkey)


@pytest.mark.parametrize("name", ["", "has space", "has+plus", "tab\there", "nbsp\u00a0here"])
def test_invalid_key_names_are_refused(name: str) -> None:
    with pytest.raises(CheckpointError, match="key name"):
        NoteSigner(name, Ed25519PrivateKey.generate())


# --- signed checkpoints ---------------------------------------------------------------------------


def test_signed_checkpoint_round_trip(
    signer: NoteSigner, verifier: NoteVerifier, checkpoint: Checkpoint
) -> None:
    note = signer.sign(checkpoint)
    assert verifier.verify(note) == checkpoint
    with_extensions = Checkpoint(ORIGIN, 2**64 - 1, ROOT, ("ext one", "ext two"))
    assert verifier.verify(signer.sign(with_extensions)) == with_extensions


def test_signed_note_layout(signer: NoteSigner, checkpoint: Checkpoint) -> None:
    note = signer.sign(checkpoint)
    body = checkpoint.body()
    assert note.startswith(body + b"\n" + f"{DASH} {ORIGIN} ".encode())
    assert note.endswith(b"\n")
    line = note[len(body) + 1 : -1].decode()
    blob = base64.b64decode(line.split(" ")[2], validate=True)
    assert blob[:4] == signer.key_id
    Ed25519PublicKey.from_public_bytes(signer.raw_public_key).verify(blob[4:], body)


def test_tampered_body_is_rejected(
    signer: NoteSigner, verifier: NoteVerifier, checkpoint: Checkpoint
) -> None:
    note = signer.sign(checkpoint)
    forged = note.replace(b"\n3\n", b"\n4\n", 1)
    assert forged != note
    with pytest.raises(CheckpointError, match="does not verify"):
        verifier.verify(forged)


def test_tampered_signature_is_rejected(
    signer: NoteSigner, verifier: NoteVerifier, checkpoint: Checkpoint
) -> None:
    note = signer.sign(checkpoint)
    body, line = note[: -len(signature_lines(note))], signature_lines(note).decode()
    name_part, encoded = line[:-1].rsplit(" ", 1)
    blob = bytearray(base64.b64decode(encoded))
    for position in (4, 20, len(blob) - 1):
        mangled = bytearray(blob)
        mangled[position] ^= 0x80
        forged = body + f"{name_part} {base64.b64encode(mangled).decode()}\n".encode()
        with pytest.raises(CheckpointError, match="does not verify"):
            verifier.verify(forged)
    truncated = body + f"{name_part} {base64.b64encode(blob[:-1]).decode()}\n".encode()
    with pytest.raises(CheckpointError, match="64-byte"):
        verifier.verify(truncated)


def test_wrong_key_is_rejected(checkpoint: Checkpoint, verifier: NoteVerifier) -> None:
    impostor = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    with pytest.raises(CheckpointError, match=f"no signature by key {ORIGIN}\\+"):
        verifier.verify(impostor.sign(checkpoint))


def test_same_key_under_another_name_is_rejected(checkpoint: Checkpoint) -> None:
    key = Ed25519PrivateKey.generate()
    other = NoteSigner("other.example/log", key)
    verifier = NoteVerifier.from_vkey(NoteSigner(ORIGIN, key).verifier_key())
    with pytest.raises(CheckpointError, match="no signature"):
        verifier.verify(other.sign(checkpoint))


def test_extra_foreign_signatures_are_tolerated(
    signer: NoteSigner, verifier: NoteVerifier, checkpoint: Checkpoint
) -> None:
    witness = NoteSigner("witness.example/w1", Ed25519PrivateKey.generate())
    rotated = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())  # same name, other key id
    note = signer.sign(checkpoint)
    mine = signature_lines(note)
    foreign = signature_lines(witness.sign(checkpoint)) + signature_lines(rotated.sign(checkpoint))
    body = note[: -len(mine)]
    assert verifier.verify(body + foreign + mine) == checkpoint
    assert verifier.verify(body + mine + foreign) == checkpoint
    # A foreign signature is ignored even when it does not verify (another body, unknown key).
    stale = signature_lines(witness.sign(Checkpoint(ORIGIN, 2, ROOT)))
    assert verifier.verify(body + stale + mine) == checkpoint
    witness_verifier = NoteVerifier.from_vkey(witness.verifier_key())
    assert witness_verifier.verify(body + foreign + mine, origin=ORIGIN) == checkpoint


def test_our_bad_signature_rejects_the_note_even_with_a_good_one(
    signer: NoteSigner, verifier: NoteVerifier, checkpoint: Checkpoint
) -> None:
    note = signer.sign(checkpoint)
    mine = signature_lines(note)
    body = note[: -len(mine)]
    other_body = signature_lines(signer.sign(Checkpoint(ORIGIN, 2, ROOT)))
    with pytest.raises(CheckpointError, match="does not verify"):
        verifier.verify(body + other_body + mine)
    with pytest.raises(CheckpointError, match="more than once"):
        verifier.verify(body + mine + mine)


def test_origin_must_match(signer: NoteSigner, verifier: NoteVerifier) -> None:
    other_log = Checkpoint("other.example/log", 3, ROOT)
    note = signer.sign(other_log)
    with pytest.raises(CheckpointError, match="origin: expected"):
        verifier.verify(note)
    assert verifier.verify(note, origin="other.example/log") == other_log
    with pytest.raises(CheckpointError, match="origin: expected 'third'"):
        verifier.verify(signer.sign(Checkpoint(ORIGIN, 3, ROOT)), origin="third")


def _malformed_notes(note: bytes) -> list[tuple[bytes, str]]:
    body_end = note.rindex(b"\n\n") + 1
    body, sig = note[:body_end], note[body_end + 1 :]
    sig_text = sig.decode()
    return [
        (note[:-1], "does not end with a newline"),
        (body + sig, "no blank line"),
        (body + b"\n", "no signature lines"),
        (body + b"\n" + sig.replace(DASH.encode(), b"-", 1), "em dash"),
        (body + b"\n" + sig.replace(f"{DASH} ".encode(), DASH.encode(), 1), "em dash"),
        (body + b"\n" + sig_text.replace(" ", "  ", 1).encode(), "expected"),
        (body + b"\n" + sig_text.replace(ORIGIN, "a+b", 1).encode(), "key name"),
        (body + b"\n" + sig[:-1] + b" extra\n", "expected"),
        (body + b"\n" + sig[:-2] + b"!\n", "base64"),
        (body + b"\n" + sig[:-1] + b"AAAA\n", "base64"),
        (body + b"\n" + f"{DASH} {ORIGIN} AAAAAA==\n".encode(), "too short"),
        (body + b"\n" + sig + b"a stray line\n", "signature line 2"),
        (body + b"\n" + sig + b"\n", "no signature lines"),
        (note.replace(b"\n", b"\r\n"), "control character"),
        (note.replace(b"\n\n", b"\n\x00\n"), "control character"),
        (note[:3] + b"\xff" + note[4:], "UTF-8"),
        (body + b"\n" + sig * (MAX_SIGNATURES + 1), "limit is"),
        (body + b"\n" + sig + b"x" * MAX_NOTE_SIZE, "exceeds"),
    ]


def test_malformed_notes_are_rejected(
    signer: NoteSigner, verifier: NoteVerifier, checkpoint: Checkpoint
) -> None:
    cases = _malformed_notes(signer.sign(checkpoint))
    for forged, reason in cases:
        with pytest.raises(CheckpointError, match=reason):
            verifier.verify(forged)


def test_signer_refuses_text_without_final_newline(signer: NoteSigner) -> None:
    with pytest.raises(CheckpointError, match="newline"):
        signer.sign_text(b"no newline")
    with pytest.raises(CheckpointError, match="control character"):
        signer.sign_text(b"tab\there\n")
