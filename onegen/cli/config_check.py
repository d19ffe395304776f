"""`onegen config check FILE [--schema COMMAND] [--set KEY=VALUE ...]`: validate a config and print it resolved.

Exit 0 and `OK` when valid; otherwise every problem on stderr, one per line (`file: dotted.key: what was expected`),
and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from onegen.cli import add_set_option
from onegen.config import SCHEMAS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate FILE (with overrides) and print the resolved config",
                               description="Validate FILE (with overrides) and print the resolved config.")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--schema", choices=sorted(SCHEMAS), default=None,
                       help="the command whose schema FILE is for; default: the smallest schema with all the "
                            "file's sections")
    add_set_option(check)


def run(args: argparse.Namespace) -> int:
    from onegen.config import config_hash, content_hash, load_config, read_sections, resolved_yaml, schema_for_sections

    schema = SCHEMAS[args.schema] if args.schema else schema_for_sections(read_sections(args.file))
    cfg = load_config(args.file, args.overrides, schema)  # ConfigError -> exit 2 in cli.main
    sys.stdout.write(resolved_yaml(cfg))
    name = next(command for command, candidate in SCHEMAS.items() if candidate is schema)
    print(f"OK: {args.file} ({name} schema, content hash {content_hash(cfg)[:12]}, config hash "
          f"{config_hash(cfg)[:12]})")
    return 0
