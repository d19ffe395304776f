"""`onegen train`: Ray Train + DeepSpeed training of the NextDiT on a build's latents.

    onegen train --config configs/train/NAME.yaml [--init PATH_OR_HUB_ID] [--set key=value ...]
    onegen train --config configs/train/finetune_lora.yaml --init PATH_OR_HUB_ID     (LoRA: model.lora)
    onegen train --stages configs/train/stage1.yaml configs/train/stage2.yaml ...   (their stages, chained)
                                                                            (= python -m training.launch ...)
"""

from __future__ import annotations

import argparse
import sys

from onegen.cli import add_config_options, config_from_args, job_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    parser.add_argument("--stages", nargs="+", metavar="FILE",
                        help="stage configs trained one after the other, each from the previous one's EMA weights: "
                             "their train.stages concatenated, every other key set once (instead of --config)")
    parser.add_argument("--init", metavar="PATH_OR_HUB_ID_OR_MODEL_URI",
                        help="start from these weights (full fine-tuning; with model.lora set, as in "
                             "configs/train/finetune_lora.yaml, the frozen base of a LoRA adapter): a release-layout "
                             "folder, hub id or registered model, e.g. lehduong/OneDiffusion, a checkpoint's "
                             "pipeline/, models:/onegen@candidate or models:/onegen/3 (= --set model.init=...)")


def run(args: argparse.Namespace) -> int:
    from onegen.train_config import TrainConfig
    from training.launch import run_train

    if bool(args.config) == bool(args.stages):
        from onegen.config import ConfigError

        raise ConfigError(["onegen train: give --config FILE (one file holding all its stages) or --stages FILE "
                           "[FILE ...] (stage files chained in order), not both and not neither"])
    if args.stages:
        args.config = list(args.stages)
    if args.init:
        args.overrides.append(f"model.init={args.init}")
    for summary in run_train(config_from_args(args, TrainConfig)):
        print(summary.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m training.launch ...`: the same command without the `onegen` front end."""
    from training import launch

    return job_main("training.launch", launch.__doc__.splitlines()[0], "train", run, argv, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
