"""`onegen build`: run the data build, or `onegen build inspect ROOT_OR_BUILD` to look at one.

    onegen build --config configs/build/NAME.yaml [--set key=value ...]     (= python -m pipelines.build ...)
    onegen build inspect work/data/builds/NAME [--out sheet.png] [--samples 8]
"""

from __future__ import annotations

import argparse
import sys

from onegen.cli import add_config_options, config_from_args, job_main
from onegen.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("words", nargs="*", metavar="inspect TARGET",
                        help="'inspect ROOT_OR_BUILD': print a build's manifest summary and write a contact sheet")
    add_config_options(parser)
    parser.add_argument("--out", metavar="PNG", help="inspect: contact sheet file (default: NAME_contact_sheet.png)")
    parser.add_argument("--samples", type=int, default=8, help="inspect: rows on the contact sheet")
    parser.add_argument("--json", action="store_true", help="inspect: print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    if args.words:
        if args.words[0] != "inspect" or len(args.words) != 2:
            raise UsageError(f"expected `onegen build inspect ROOT_OR_BUILD`, got {' '.join(args.words)!r}")
        from pipelines.inspect_build import format_summary, inspect_build, summary_json

        summary, sheet = inspect_build(args.words[1], args.out, samples=args.samples)
        print(summary_json(summary) if args.json else format_summary(summary))
        if sheet:
            print(f"contact sheet: {sheet}")
        return 0
    if not args.config:
        raise UsageError("onegen build needs --config FILE (see configs/build/), or `inspect TARGET`")
    from onegen.build_config import BuildConfig
    from pipelines.build import run_build

    summary = run_build(config_from_args(args, BuildConfig))
    print(summary.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.build ...`: the same command without the `onegen` front end."""
    from pipelines import build

    return job_main("pipelines.build", build.__doc__.splitlines()[0], "build", run, argv, words=[])


if __name__ == "__main__":
    sys.exit(main())
