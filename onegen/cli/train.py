"""`onegen train`: Ray Train + DeepSpeed training of the NextDiT on a build's latents.

    onegen train --config configs/train/NAME.yaml [--set key=value ...]     (= python -m training.launch ...)
"""

from __future__ import annotations

import argparse
import sys

from onegen.cli import ArgumentParser, add_config_options, config_from_args, run_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser, required=True)


def run(args: argparse.Namespace) -> int:
    from onegen.train_config import TrainConfig
    from training.launch import run_train

    summary = run_train(config_from_args(args, TrainConfig))
    print(summary.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m training.launch ...`: the same command without the `onegen` front end."""
    from training import launch

    parser = ArgumentParser(prog="python -m training.launch", description=launch.__doc__.splitlines()[0])
    add_config_options(parser, required=True)
    args = parser.parse_args(argv)
    args.command = "train"
    return run_command("train", run, args)


if __name__ == "__main__":
    sys.exit(main())
