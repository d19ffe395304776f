"""The `onegen` command line.

Each command lives in its own module, imported only when that command runs (so `onegen --help` stays fast: no
torch or ray at import). A command module provides:

    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int          # the exit status

Adding a command is one line in COMMANDS.

Exit status (`run_command`): 0 done; 2 bad input, one line per problem, nothing ran (argparse errors,
onegen.errors.UsageError, onegen.config.ConfigError); 1 a failure while running: what failed, in which step, with
which input (onegen.errors.step), and where the traceback was saved (ONEGEN_DEBUG=1 raises it instead); operational
errors that already name their fix (unreachable Ray, storage errors, a missing input file) stay one line; 130
interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from onegen.secrets import install_log_redaction, redact  # stdlib only: `onegen --help` stays fast

# (name, module, one-line help). Keep only commands that work.
COMMANDS: list[tuple[str, str, str]] = [
    ("env", "onegen.cli.env", "show versions, devices, Ray address, MLflow URI and storage root"),
    ("config", "onegen.cli.config_check", "check a config file and print it resolved"),
    ("synth", "onegen.cli.synth", "render the synthetic world (exact labels) or draw a contact sheet"),
    ("build", "onegen.cli.build", "build the One-Gen dataset (Ray Data job), or `build inspect` one"),
    ("train", "onegen.cli.train", "train OneDiffusion on a build (Ray Train + DeepSpeed), checkpointed and resumable"),
    ("demo", "onegen.cli.demo", "run the demo chain: synthetic world -> Ray -> shards -> train -> sample -> evaluate"),
]

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2  # bad arguments or config, nothing ran: also argparse's own status
EXIT_INTERRUPTED = 130

_WORK_DIR_ATTR = "_onegen_work_dir"  # set on args by config_from_args: where a failure's traceback is saved


def add_config_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE` for commands that take a config."""
    parser.add_argument("--config", metavar="FILE", required=required,
                        help="YAML config (see configs/)" + ("" if required else "; default: built-in defaults"))
    add_set_option(parser)


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")


def config_from_args(args: argparse.Namespace, schema=None):
    """The resolved config named by --config/--set (built-in defaults without --config), validated against `schema`:
    default the command's own (onegen.config.SCHEMAS[args.command]); a command without a schema of its own (`env`)
    accepts any command's config, validated against the smallest schema with all its sections. Raises ConfigError.

    Remembers the config's run.work_dir on `args`, so a failure report saves its traceback there."""
    from onegen.config import SCHEMAS, default_config, load_config, read_sections, schema_for_sections

    if schema is None:
        schema = SCHEMAS.get(getattr(args, "command", None))
    if schema is None:
        sections = read_sections(args.config) if getattr(args, "config", None) else set()
        sections |= {item.partition("=")[0].split(".")[0].split("[")[0].strip() for item in args.overrides}
        schema = schema_for_sections(sections)
    if getattr(args, "config", None) is None and not args.overrides:
        cfg = default_config(schema)
    elif getattr(args, "config", None) is None:
        cfg = load_config(None, ["run.name=onegen", *args.overrides], schema)
    else:
        cfg = load_config(args.config, args.overrides, schema)
    setattr(args, _WORK_DIR_ATTR, cfg.run.work_dir)
    return cfg


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors never repeat a secret: they quote what was typed (`invalid choice: '...'`),
    which may be a URL with a password. Sub-parsers are made of the same class."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {redact(message)}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to add its arguments."""
    parser = ArgumentParser(prog="onegen", description="Build the One-Gen dataset and train OneDiffusion "
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


def job_main(module: str, description: str, command: str, run: Callable[[argparse.Namespace], int],
             argv: list[str] | None = None, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
             **defaults) -> int:
    """`python -m MODULE --config F [--set ...]`, a job's own entry point (what `ray job submit` runs): the config
    options (or the command's own `add_arguments`), `run` and error reporting of `onegen COMMAND` without the
    `onegen` front end. `defaults`: attributes the command's other arguments would set."""
    parser = ArgumentParser(prog=f"python -m {module}", description=description)
    if add_arguments is None:
        add_config_options(parser, required=True)
    else:
        add_arguments(parser)
    args = parser.parse_args(argv)
    vars(args).update(defaults, command=command)
    return run_command(command, run, args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)  # bad arguments: argparse prints usage and exits 2
    return run_command(args.command, args._run, args)


def run_command(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)`'s exit status, with what it raises reported on stderr by the rules in the module docstring.
    Also for modules runnable on their own (`python -m ...`), so they report errors the same way."""
    from onegen.config import ConfigError
    from onegen.errors import UsageError

    install_log_redaction()  # no log line of this process shows a secret, whichever library writes it
    _stop_on_sigterm()
    try:
        return int(run(args))
    except KeyboardInterrupt:
        print(f"onegen {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as err:  # every problem, one line each, already naming file and key: a traceback adds nothing
        for line in err.problems:
            print(line, file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        if os.environ.get("ONEGEN_DEBUG"):
            raise
        if isinstance(err, UsageError):
            print(f"onegen {command}: error: {redact(str(err))}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if _says_what_to_fix(err):
            print(f"onegen {command}: error{_where(err)}: {redact(str(err))}", file=sys.stderr)
            return EXIT_FAILED
        report_failure(command, err, getattr(args, _WORK_DIR_ATTR, None))
        return EXIT_FAILED


def _stop_on_sigterm() -> None:
    """SIGTERM (`ray job stop`, `kill`, a scheduler's stop) ends the command as Ctrl-C does: `finally` blocks run,
    Ray and MLflow are shut down, and the MLflow run ends KILLED instead of staying RUNNING forever."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def _says_what_to_fix(err: BaseException) -> bool:
    """Operational errors whose message names the address, URI or file and the fix: one line is the whole story."""
    from onegen.errors import UnreachableError

    known: tuple[type[BaseException], ...] = (UnreachableError, FileNotFoundError)
    storage = sys.modules.get("onegen.storage")  # not imported: the error cannot be a StorageError
    if storage is not None:
        known += (storage.StorageError,)
    return isinstance(err, known)


def _where(err: BaseException) -> str:
    """The failed step and its input as marked by onegen.errors.step, e.g. " in step 'render shards' (input:
    s3://b/p)"; "" when the code marked none."""
    from onegen.errors import failed_step

    name, given = failed_step(err)
    if name is None:
        return ""
    return f" in step '{name}'" + (f" (input: {redact(str(given))})" if given else "")


def report_failure(command: str, err: BaseException, work_dir: str | os.PathLike | None = None) -> Path | None:
    """Print what failed (step, input, exception type and message) and save the traceback under
    `<work_dir or the temp dir>/logs/`; returns the file (None if no folder was writable: then it is printed)."""
    print(f"onegen {command}: failed{_where(err)}: {type(err).__name__}: {redact(str(err))}", file=sys.stderr)
    saved = save_traceback(command, err, work_dir)
    if saved is None:
        print(redact("".join(traceback.format_exception(err))), file=sys.stderr)
    else:
        print(f"onegen {command}: traceback saved to {saved} (ONEGEN_DEBUG=1 prints it instead)", file=sys.stderr)
    return saved


def save_traceback(command: str, err: BaseException, work_dir: str | os.PathLike | None = None) -> Path | None:
    """Write err's traceback to <work_dir>/logs/onegen-<command>-<timestamp>-<pid>.traceback.txt, falling back to
    the temp dir when the work dir is unknown or not writable. None when neither is writable."""
    text = redact("".join(traceback.format_exception(err)))
    name = f"onegen-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.traceback.txt"
    for base in ([work_dir] if work_dir else []) + [tempfile.gettempdir()]:
        path = Path(base) / "logs" / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            return path
        except OSError:
            continue
    return None


def _version() -> str:
    try:
        return metadata.version("onegen")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
