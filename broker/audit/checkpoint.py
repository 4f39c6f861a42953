"""Signed tree heads: C2SP ``tlog-checkpoint`` bodies in C2SP ``signed-note`` envelopes (Ed25519).

A checkpoint body is three lines (origin, decimal tree size, base64 root hash) plus optional
extension lines, each ending in a newline. A signed note is that text, a blank line, and one or
more signature lines ``— <key name> <base64(4-byte key id || signature)>``. The verifier key
string is ``<name>+<hex key id>+<base64(0x01 || public key)>``, as in Go's
``golang.org/x/mod/sumdb/note``.

Specifications: https://c2sp.org/tlog-checkpoint and https://c2sp.org/signed-note.
Parsing is strict: anything not exactly in that form is rejected with :class:`CheckpointError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from hashlib import sha256

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.audit.merkle import HASH_SIZE

ED25519_TYPE = 0x01
"""Signature type byte of Ed25519 note signatures (C2SP signed-note)."""

MAX_TREE_SIZE = 2**64 - 1
"""Largest tree size accepted (the uint64 range other implementations use)."""

MAX_NOTE_SIZE = 1 << 20
"""NOTE: notes are bounded before parsing so a hostile input cannot make us do unbounded work."""

MAX_SIGNATURES = 100
"""Most signature lines accepted in one note (the spec requires at least 16)."""

_SIG_PREFIX = "\u2014 "  # em dash, space
_ED25519_KEY_SIZE = 32
_ED25519_SIG_SIZE = 64
_KEY_ID_SIZE = 4
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_HEX_KEY_ID = re.compile(r"[0-9a-f]{8}")


class CheckpointError(ValueError):
    """A checkpoint, signed note or verifier key is malformed or fails verification."""


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: origin line, tree size, root hash and optional extension lines.

    Construction validates the fields and raises :class:`CheckpointError` if the origin or an
    extension line is empty or contains a control character, the size is out of range, or the
    root is not a 32-byte hash.
    """

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        if isinstance(self.size, bool) or not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointError(f"tree size: expected 0..{MAX_TREE_SIZE}, got {self.size!r}")
        if len(self.root) != HASH_SIZE:
            raise CheckpointError(f"root hash: expected {HASH_SIZE} bytes, got {len(self.root)}")
        for number, line in enumerate(self.extensions, start=1):
            _check_line(line, f"extension line {number}")

    def body(self) -> bytes:
        """Return the checkpoint note text: each line UTF-8 and terminated by a newline."""
        lines = [self.origin, str(self.size), _b64encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines).encode("utf-8")

    @classmethod
    def parse(cls, body: bytes) -> Checkpoint:
        """Parse a checkpoint note text (the signed part of the note) strictly.

        Raises :class:`CheckpointError` if the text is not UTF-8, does not end in a newline,
        has fewer than three lines, an empty line, a control character, a size that is not
        canonical decimal, or a root that is not canonical base64 of a 32-byte hash.
        """
        text = _decode_note_text(body, "checkpoint")
        if not text.endswith("\n"):
            raise CheckpointError("checkpoint: text does not end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(f"checkpoint: expected at least 3 lines, got {len(lines)}")
        origin, size_line, root_line, *extensions = lines
        if not _DECIMAL.fullmatch(size_line) or len(size_line) > len(str(MAX_TREE_SIZE)):
            raise CheckpointError(f"checkpoint: tree size {size_line!r} is not a decimal number")
        try:
            root = _b64decode(root_line)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint: root hash: {exc}") from None
        return cls(origin, int(size_line), root, tuple(extensions))


def ed25519_key_id(name: str, public_key: bytes) -> bytes:
    """Return the 4-byte note key ID ``SHA-256(name || 0x0A || 0x01 || public_key)[:4]``."""
    return sha256(name.encode("utf-8") + b"\n" + bytes([ED25519_TYPE]) + public_key).digest()[
        :_KEY_ID_SIZE
    ]


class NoteSigner:
    """Signs checkpoints as C2SP signed notes with an Ed25519 key named ``name``."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        """Raises :class:`CheckpointError` if ``name`` is not a valid note key name."""
        _check_key_name(name)
        self.name = name
        self._private_key = private_key
        self.raw_public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = ed25519_key_id(name, self.raw_public_key)

    def __repr__(self) -> str:
        return f"NoteSigner({self.name!r}, key_id={self.key_id.hex()})"

    def verifier_key(self) -> str:
        """Return the verifier key string ``<name>+<hex key id>+<base64(0x01 || public key)>``."""
        encoded = _b64encode(bytes([ED25519_TYPE]) + self.raw_public_key)
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    def sign(self, checkpoint: Checkpoint) -> bytes:
        """Return the signed note carrying ``checkpoint``, signed by this key."""
        return self.sign_text(checkpoint.body())

    def sign_text(self, text: bytes) -> bytes:
        """Return ``text`` as a signed note with one signature by this key.

        Raises :class:`CheckpointError` if ``text`` is not UTF-8, does not end in a newline or
        contains a control character other than newline.
        """
        checked = _decode_note_text(text, "note text")
        if not checked.endswith("\n"):
            raise CheckpointError("note text does not end with a newline")
        signature = self._private_key.sign(text)
        line = f"{_SIG_PREFIX}{self.name} {_b64encode(self.key_id + signature)}\n"
        return text + b"\n" + line.encode("utf-8")


class NoteVerifier:
    """Verifies signed notes against one trusted Ed25519 key (name, key ID, public key)."""

    def __init__(self, name: str, public_key: Ed25519PublicKey) -> None:
        """Raises :class:`CheckpointError` if ``name`` is not a valid note key name."""
        _check_key_name(name)
        self.name = name
        self._public_key = public_key
        raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id = ed25519_key_id(name, raw)

    def __repr__(self) -> str:
        return f"NoteVerifier({self.name!r}, key_id={self.key_id.hex()})"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Build a verifier from a key string ``<name>+<hex key id>+<base64(0x01 || key)>``.

        Raises :class:`CheckpointError` if the string is malformed, the key type is not
        Ed25519, or the key ID does not match the name and public key.
        """
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise CheckpointError("verifier key: expected <name>+<key id>+<base64 key>")
        name, hex_id, encoded = parts
        _check_key_name(name)
        if not _HEX_KEY_ID.fullmatch(hex_id):
            raise CheckpointError(f"verifier key: key id {hex_id!r} is not 8 lowercase hex digits")
        try:
            typed_key = _b64decode(encoded)
        except ValueError as exc:
            raise CheckpointError(f"verifier key: {exc}") from None
        if len(typed_key) != 1 + _ED25519_KEY_SIZE or typed_key[0] != ED25519_TYPE:
            raise CheckpointError("verifier key: expected type 0x01 followed by a 32-byte key")
        raw = typed_key[1:]
        expected_id = ed25519_key_id(name, raw).hex()
        if hex_id != expected_id:
            raise CheckpointError(f"verifier key: key id: expected {expected_id}, got {hex_id}")
        return cls(name, Ed25519PublicKey.from_public_bytes(raw))

    def verify(self, note: bytes, origin: str | None = None) -> Checkpoint:
        """Verify a signed checkpoint note and return the checkpoint it carries.

        The checkpoint's origin must equal ``origin``, which defaults to this key's name
        (tlog-checkpoint: a log's key name matches its origin). Raises :class:`CheckpointError`
        for any reason :meth:`verify_text` or :meth:`Checkpoint.parse` gives, or an origin
        mismatch.
        """
        checkpoint = Checkpoint.parse(self.verify_text(note))
        expected = self.name if origin is None else origin
        if checkpoint.origin != expected:
            raise CheckpointError(
                f"checkpoint origin: expected {expected!r}, got {checkpoint.origin!r}"
            )
        return checkpoint

    def verify_text(self, note: bytes) -> bytes:
        """Verify a signed note and return its text (everything before the last blank line).

        Signatures by other keys (another name or key ID) are ignored, as C2SP signed-note
        requires. Raises :class:`CheckpointError` if the note is malformed (too large, not
        UTF-8, a control character, no trailing newline, no blank line before the signatures,
        a malformed signature line), a signature by this key does not verify or appears twice,
        or no signature by this key is present.
        """
        if len(note) > MAX_NOTE_SIZE:
            raise CheckpointError(f"note: {len(note)} bytes exceeds the limit of {MAX_NOTE_SIZE}")
        decoded = _decode_note_text(note, "note")
        if not decoded.endswith("\n"):
            raise CheckpointError("note does not end with a newline")
        split = decoded.rfind("\n\n")
        if split < 0:
            raise CheckpointError("note has no blank line before its signatures")
        text, signature_block = decoded[: split + 1], decoded[split + 2 : -1]
        lines = signature_block.split("\n") if signature_block else []
        if not lines:
            raise CheckpointError("note has no signature lines")
        if len(lines) > MAX_SIGNATURES:
            raise CheckpointError(f"note has {len(lines)} signatures, limit is {MAX_SIGNATURES}")
        signed = text.encode("utf-8")
        verified = 0
        for number, line in enumerate(lines, start=1):
            name, key_id, signature = _parse_signature_line(line, number)
            if name != self.name or key_id != self.key_id:
                continue  # NOTE: another key's signature (witness, rotated key): ignored.
            if verified:
                raise CheckpointError(f"note: key {self._label()} signed more than once")
            self._check_signature(signed, signature, number)
            verified += 1
        if not verified:
            raise CheckpointError(f"note: no signature by key {self._label()}")
        return signed

    def _check_signature(self, signed: bytes, signature: bytes, number: int) -> None:
        if len(signature) != _ED25519_SIG_SIZE:
            raise CheckpointError(
                f"signature line {number}: expected a {_ED25519_SIG_SIZE}-byte Ed25519 "
                f"signature, got {len(signature)} bytes"
            )
        try:
            self._public_key.verify(signature, signed)
        except InvalidSignature:
            raise CheckpointError(
                f"signature line {number}: signature by key {self._label()} does not verify"
            ) from None

    def _label(self) -> str:
        return f"{self.name}+{self.key_id.hex()}"


def _parse_signature_line(line: str, number: int) -> tuple[str, bytes, bytes]:
    """Split ``— <name> <base64(key id || signature)>`` into name, key ID and signature."""
    where = f"signature line {number}"
    if not line.startswith(_SIG_PREFIX):
        raise CheckpointError(f"{where}: does not start with an em dash and a space")
    fields = line[len(_SIG_PREFIX) :].split(" ")
    if len(fields) != 2:
        raise CheckpointError(f"{where}: expected '\u2014 <key name> <base64 signature>'")
    name, encoded = fields
    _check_key_name(name)
    try:
        blob = _b64decode(encoded)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if len(blob) <= _KEY_ID_SIZE:
        raise CheckpointError(f"{where}: signature is too short ({len(blob)} bytes)")
    return name, blob[:_KEY_ID_SIZE], blob[_KEY_ID_SIZE:]


def _decode_note_text(data: bytes, what: str) -> str:
    """Decode UTF-8 and reject ASCII control characters other than newline (signed-note)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{what} is not valid UTF-8") from None
    for char in text:
        if char < " " and char != "\n":
            raise CheckpointError(f"{what} contains control character {char!r}")
    return text


def _check_line(line: str, what: str) -> None:
    if not line:
        raise CheckpointError(f"{what} is empty")
    for char in line:
        if char < " ":
            raise CheckpointError(f"{what} contains control character {char!r}")


def _check_key_name(name: str) -> None:
    """Key names are non-empty, without Unicode spaces or '+' (C2SP signed-note)."""
    if not name or "+" in name or any(c.isspace() or c < " " for c in name):
        raise CheckpointError(f"key name {name!r}: must be non-empty, without spaces or '+'")


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode standard, padded, canonical base64 (RFC 4648 §4) or raise ``ValueError``."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError(f"{text!r} is not valid base64") from None
    if _b64encode(data) != text:
        raise ValueError(f"{text!r} is not canonical base64")
    return data
