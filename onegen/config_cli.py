"""`onegen config check FILE [--set KEY=VALUE ...]`: validate a config and print it resolved.

Exit 0 and `OK` when valid; otherwise every problem on stderr, one per line (`file: dotted.key: what was expected`),
and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from onegen.cli import add_set_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate FILE (with overrides) and print the resolved config",
                               description="Validate FILE (with overrides) and print the resolved config.")
    check.add_argument("file", metavar="FILE")
    add_set_option(check)


def run(args: argparse.Namespace) -> int:
    from onegen.config import config_hash, load_config, resolved_yaml

    cfg = load_config(args.file, args.overrides)  # ConfigError -> exit 2 in cli.main
    sys.stdout.write(resolved_yaml(cfg))
    print(f"OK: {args.file} (config hash {config_hash(cfg)[:12]})")
    return 0
