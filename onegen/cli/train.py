"""`onegen train`: Ray Train + DeepSpeed training of the NextDiT on a build's latents.

    onegen train --config configs/train/NAME.yaml [--init PATH_OR_HUB_ID] [--set key=value ...]
                                                                            (= python -m training.launch ...)
"""

from __future__ import annotations

import argparse
import sys

from onegen.cli import add_config_options, config_from_args, job_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, required=True)
    parser.add_argument("--init", metavar="PATH_OR_HUB_ID",
                        help="start from these weights (full fine-tuning): a release-layout folder or hub id, e.g. "
                             "lehduong/OneDiffusion or a checkpoint's pipeline/ (= --set model.init=...)")


def run(args: argparse.Namespace) -> int:
    from onegen.train_config import TrainConfig
    from training.launch import run_train

    if args.init:
        args.overrides.append(f"model.init={args.init}")
    summary = run_train(config_from_args(args, TrainConfig))
    print(summary.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m training.launch ...`: the same command without the `onegen` front end."""
    from training import launch

    return job_main("training.launch", launch.__doc__.splitlines()[0], "train", run, argv, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
