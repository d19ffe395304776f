"""The `onegen` command line.

Each command lives in its own module, imported only when that command runs (so `onegen --help` stays fast: no
torch or ray at import). A command module provides:

    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int          # the exit status

Adding a command is one line in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib import metadata

# (name, module, one-line help). Keep only commands that work.
COMMANDS: list[tuple[str, str, str]] = [
    ("env", "onegen.envinfo", "show versions, devices, Ray address, MLflow URI and storage root"),
    ("config", "onegen.config_cli", "check a config file and print it resolved"),
    ("synth", "pipelines.sources.synthetic_cli", "render the synthetic world (exact labels) or draw a contact sheet"),
    ("demo", "onegen.demo", "run the demo chain: synthetic world -> Ray -> shards -> train -> sample -> evaluate"),
]

EXIT_CONFIG_ERROR = 2


def add_config_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` for commands that take a config."""
    parser.add_argument("--config", metavar="FILE", required=required,
                        help="YAML config (see configs/)" + ("" if required else "; default: built-in defaults"))
    add_set_option(parser)


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")


def config_from_args(args: argparse.Namespace):
    """The resolved config named by --config/--set (built-in defaults without --config). Raises ConfigError."""
    from onegen.config import default_config, load_config

    if getattr(args, "config", None) is None and not args.overrides:
        return default_config()
    if getattr(args, "config", None) is None:
        return load_config(None, ["run.name=onegen", *args.overrides])
    return load_config(args.config, args.overrides)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="onegen", description="Build the One-Gen dataset and train OneDiffusion "
                                                                "with Ray, DeepSpeed and MLflow.")
    parser.add_argument("--version", action="version", version=f"onegen {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from onegen.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._run(args))
    except ConfigError as err:
        for line in err.problems:
            print(line, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (ValueError, OSError, ConnectionError) as err:
        # Bad input (arguments, files, paths, unreachable services): one line that names it, not a traceback.
        # ONEGEN_DEBUG=1 shows the traceback.
        if os.environ.get("ONEGEN_DEBUG"):
            raise
        print(f"onegen {args.command}: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        return 130


def _version() -> str:
    try:
        return metadata.version("onegen")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
