"""`keys`: make a new service key. `python -m src.cli.keys new NAME` (from backend/).

Prints the key once (store it in the caller's secret store: the service never sees it again) and the TOML block
to append to SERVICE_KEYS_FILE, which holds only the key's SHA-256.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import TextIO

from src.core.keys import KEY_NAME_PATTERN, key_digest

KEY_PREFIX = "llmsvc-"
KEY_RANDOM_BYTES = 32
EXIT_OK = 0
EXIT_BAD_ARGUMENTS = 2


def new_key() -> str:
    # 256 random bits; the prefix makes a leaked key recognisable to secret scanners and to people.
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def toml_block(name: str, key: str) -> str:
    return (
        "[[keys]]\n"
        f'name = "{name}"\n'
        f'sha256 = "{key_digest(key)}"\n'
        '# models = ["gpt-5-mini"]          # optional allowlist\n'
        "# requests_per_minute = 600\n"
        "# tokens_per_minute = 200000\n"
        "# tokens_per_day = 5000000          # a budget, reset at 00:00 UTC\n"
    )


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    parser = argparse.ArgumentParser(prog="keys", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="print a fresh key once, and its TOML block for SERVICE_KEYS_FILE")
    new.add_argument("name", help="the key's name in logs, metrics and the ledger (letters, digits, . _ : -)")
    args = parser.parse_args(argv)
    if not KEY_NAME_PATTERN.fullmatch(args.name):
        print(f"keys: invalid name {args.name!r}: 1-64 characters of letters, digits and . _ : -", file=err)
        return EXIT_BAD_ARGUMENTS
    key = new_key()
    print(f"key (shown once; give it to the caller, keep it secret): {key}\n", file=out)
    print(f"# append to SERVICE_KEYS_FILE:\n{toml_block(args.name, key)}", file=out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
