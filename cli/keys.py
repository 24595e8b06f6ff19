"""``fleet keys generate --out DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.options import env_default


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    sub.required = True
    gen = sub.add_parser("generate", help="write DIR/hub.key (private, mode 600) and DIR/hub.pub")
    gen.add_argument(
        "--out",
        type=Path,
        required=env_default("FLEET_KEYS_OUT") is None,
        default=env_default("FLEET_KEYS_OUT"),
        help="directory for the key pair",
    )
    gen.add_argument("--force", action="store_true", help="overwrite an existing key pair")


def run(args: argparse.Namespace) -> int:
    """Generate the key pair."""
    from bus.errors import InvalidInput
    from bus.signing import generate_keypair

    out: Path = Path(args.out)
    if (out / "hub.key").exists() and not args.force:
        raise InvalidInput(f"{out / 'hub.key'} exists; pass --force to replace it")
    key, pub = generate_keypair(out)
    print(f"private key: {key}\npublic key:  {pub}")
    return 0
