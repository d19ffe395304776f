"""`onegen build`: run the data build, or `onegen build inspect ROOT_OR_BUILD` to look at one.

    onegen build --config configs/build/NAME.yaml [--set key=value ...]     (= python -m pipelines.build ...)
    onegen build inspect work/data/builds/NAME [--out sheet.png] [--samples 8] [--seed 0] [--cell 128] [--json]
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
    parser.add_argument("--samples", type=int, default=8, help="inspect: random rows on the contact sheet (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="inspect: which random rows")
    parser.add_argument("--cell", type=int, default=128, help="inspect: picture size on the sheet (pictures are "
                                                              "only shrunk: the bucket size or more shows them 1:1)")
    parser.add_argument("--json", action="store_true", help="inspect: print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    if args.words:
        if args.words[0] != "inspect" or len(args.words) != 2:
            raise UsageError(f"expected `onegen build inspect ROOT_OR_BUILD`, got {' '.join(args.words)!r}")
        from pipelines.inspect_build import format_summary, inspect_build, summary_json

        if args.samples < 0 or args.cell < 16:
            raise UsageError(f"inspect: --samples must be >= 0 and --cell >= 16, got {args.samples} and {args.cell}")
        result = inspect_build(args.words[1], args.out, samples=args.samples, seed=args.seed, cell=args.cell)
        if args.json:  # stdout stays one JSON document
            print(summary_json(dict(result.summary, contact_sheet=result.sheet)))
        else:
            print(format_summary(result.summary))
        for warning in result.warnings:
            print(warning, file=sys.stderr)
        if result.sheet and not args.json:
            print(f"contact sheet: {result.sheet} ({result.rows} random rows, every view decoded from its latents, "
                  "with the prompts the trainer builds)")
        elif not args.json:
            print("no contact sheet: " + ("--samples 0" if args.samples == 0 else "the build has no rows yet"))
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
