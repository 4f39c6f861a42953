"""``broker keys kek generate|rotate``, and opening the store's sealed keys for the offline
commands (``audit verify|export|proof``, ``policy explain --dev``) with the KEK alone."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.cli.main import EXIT_OK, _out
from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.keys.kek import Kek
    from broker.keys.store import KeyStore
    from broker.store.db import Store

KEK_ENV = "BROKER_KEK_FILE"
TRANSIT_ENV = "BROKER_KEK_TRANSIT_KEY"


def kek_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kek-file",
        type=Path,
        default=os.environ.get(KEK_ENV),
        help=f"the KEK that seals the store's keys (default: ${KEK_ENV}, else <data-dir>/kek)",
    )


def offline_kek(kek_file: Path | None, data_dir: Path) -> Kek:
    """The KEK named by --kek-file / BROKER_KEK_FILE, else the data dir's; never a new one.
    Raises ConfigError."""
    from broker.keys.kek import DEFAULT_KEK_FILE, load_kek

    if os.environ.get(TRANSIT_ENV):
        from broker.keys.transit import unwrap_kek
        from broker.settings import Settings

        if kek_file is None:
            raise ConfigError(f"{TRANSIT_ENV} is set: pass --kek-file (the wrapped KEK)")
        return unwrap_kek(Path(kek_file), Settings())
    if kek_file is not None:
        return load_kek(Path(kek_file))
    default = data_dir / DEFAULT_KEK_FILE
    if not default.exists():
        raise ConfigError(
            f"the store's keys are sealed with a KEK: pass --kek-file or set {KEK_ENV} "
            f"(there is no {default})"
        )
    return load_kek(default)


def open_store(data_dir: Path, database_url: str | None) -> Store:
    """The store of --database-url, else of the data dir. Raises ConfigError when neither
    holds one, or it predates sealed keys."""
    from broker.store.db import HEAD_REVISION, Store, sqlite_url

    if database_url is None and not (data_dir / "broker.db").exists():
        raise ConfigError(f"no broker database in {data_dir}: pass --data-dir or --database-url")
    store = Store(database_url or sqlite_url(data_dir))
    revision = store.revision()
    if revision is None or revision < "0008":
        store.close()
        raise ConfigError(
            f"the database is at schema {revision}, before keys moved into the store: start "
            f"this version's broker on it once (it migrates; needs schema {HEAD_REVISION})"
        )
    return store


def key_store(data_dir: Path, database_url: str | None, kek_file: Path | None) -> KeyStore:
    """The sealed keys of the store named by --data-dir / --database-url, opened with the KEK
    of --kek-file (no data dir needed with both). Raises ConfigError."""
    from broker.keys.store import KeyStore

    kek = offline_kek(kek_file, data_dir)
    return KeyStore(open_store(data_dir, database_url), kek)


def cmd_kek_generate(args: argparse.Namespace) -> int:
    from broker.keys.kek import create_exclusive, generate

    if args.transit_key:
        from broker.keys.transit import wrapped_kek
        from broker.settings import Settings

        settings = Settings(kek_transit_key=args.transit_key, kek_transit_mount=args.transit_mount)
        kek = wrapped_kek(settings)
    else:
        kek = generate()
    if args.out is None:
        print(kek)
        return EXIT_OK
    if not create_exclusive(Path(args.out), (kek + "\n").encode()):
        raise ConfigError(f"--out: {args.out} exists; a KEK file is never overwritten")
    _out(args, {"file": str(args.out)}, lambda: f"wrote a new KEK to {args.out} (mode 0600)")
    return EXIT_OK


def cmd_kek_rotate(args: argparse.Namespace) -> int:
    keys = key_store(Path(args.data_dir), args.database_url, args.kek_file)
    new = offline_kek(Path(args.new), Path(args.data_dir))
    if new.key == keys.kek.key:
        raise ConfigError(f"--new: {args.new} holds the KEK the keys are sealed with already")
    try:
        count = keys.reseal(new)
    finally:
        keys.store.close()
    data: dict[str, Any] = {"resealed": count, "kek_file": str(args.new)}
    _out(
        args,
        data,
        lambda: f"resealed {count} keys with {args.new}: start every replica with it now",
    )
    return EXIT_OK


def add_commands(keys: Any) -> None:
    """``keys kek ...`` under the ``keys`` command's subparsers."""
    kek = keys.add_parser("kek", help="the key-encryption key that seals the store's keys")
    sub = kek.add_subparsers(dest="kek_cmd", required=True)
    p = sub.add_parser("generate", help="print a fresh KEK (base64 of 32 random bytes)")
    p.add_argument("--out", type=Path, help="write it to this new file (0600) instead")
    p.add_argument(
        "--transit-key",
        help="make it wrapped by this OpenBao/Vault transit key (VAULT_ADDR and the broker's "
        "Vault auth): the output is the ciphertext, the KEK is never shown",
    )
    p.add_argument("--transit-mount", default="transit")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_kek_generate)
    p = sub.add_parser(
        "rotate", help="reseal every key in the store with a new KEK, in one transaction"
    )
    p.add_argument("--new", required=True, type=Path, help="the new KEK's file")
    p.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("BROKER_DATA_DIR", ".broker"))
    )
    p.add_argument("--database-url", default=os.environ.get("BROKER_DATABASE_URL"))
    kek_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_kek_rotate)
