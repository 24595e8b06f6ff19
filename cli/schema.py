"""``fleet schema [--out DIR]``: JSON Schema of every message."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    """Add the subcommand's arguments."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write one <Message>.schema.json per message here (else all on stdout)",
    )


def run(args: argparse.Namespace) -> int:
    """Print or write the schemas."""
    from bus.schema import all_schemas

    schemas = all_schemas()
    if args.out is None:
        print(json.dumps(schemas, indent=2, sort_keys=True))
        return 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name, schema in schemas.items():
        (out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(schemas)} schemas to {out}")
    return 0
