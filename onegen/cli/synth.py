"""`onegen synth ...`: render the synthetic world to a folder or WebDataset shards, or draw a contact sheet.

    onegen synth render --scenes 100 --views 4 --size 128 --seed 0 --out DIR|s3://BUCKET/PREFIX [--format folder|wds]
    onegen synth sheet --out sheet.png|s3://BUCKET/KEY.png --scenes 3 --views 4 --size 128 --seed 0

Also runnable as `python -m onegen.cli.synth ...`. The shard writing itself is
`pipelines.sources.synthetic.write_wds_shards`.
The wiring is `add_arguments(subparser)` + `run(args) -> exit code`.

`--out` is a storage root (onegen.storage.Storage): a local path, file:///path or s3://bucket/prefix; S3 settings come
from the standard AWS environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_PROFILE or AWS_ACCESS_KEY_ID, ...).
Every file is written atomically (locally temp file + fsync + rename; on S3 one PUT), so a file that exists is
complete.

Folder format: every sample's WebDataset members as files `<key>.<ext>` (png, depth.npy, instance.png, semantic.png,
json); read one back with `pipelines.record.read_sample_files(root, key)`. WebDataset format: shards of
`--scenes-per-shard` whole scenes (all views of a scene stay in one shard), built by `synthetic.render_shard_bytes`
and named `synthetic-<seed>-<first scene:06d>-<settings>.tar` (`synthetic.shard_name`), where <settings> is 8 hex
digits of everything else that changes the shard's bytes: its number of scenes, --size, --views, --no-figures,
--image-format and the generator version (`synthetic.shard_settings_digest`). Re-running with the same arguments
rewrites identical shards; `--skip-existing` skips shards that exist, and since a name fixes the content, a rerun
with other settings renders new shards instead of keeping stale ones (the old ones stay beside them: give each
dataset its own --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from model.limits import MAX_IMAGE_SIDE
from onegen.cli import ArgumentParser, run_command
from onegen.config import not_a_folder_problem
from onegen.errors import UsageError, step
from onegen.storage import StorageError
from pipelines.record import as_storage, write_sample_files
from pipelines.sources.synthetic import resolve_config, synthetic_samples, write_wds_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="synth_command", required=True, metavar="{render,sheet}")
    r = sub.add_parser("render", help="render N scenes x V views to a folder or WebDataset shards",
                       description="Render synthetic scenes with exact labels (see pipelines/sources/synthetic.py).")
    _common(r, scenes=10)
    r.add_argument("--out", required=True,
                   help="output folder: a local path (created if missing), file:///path or s3://bucket/prefix")
    r.add_argument("--format", choices=("folder", "wds"), default="folder",
                   help="folder: files <key>.<ext>; wds: WebDataset tar shards (default: folder)")
    r.add_argument("--first-scene", type=int, default=0, help="index of the first scene (to split work)")
    r.add_argument("--scenes-per-shard", type=int, default=100, help="scenes per WebDataset shard (wds only)")
    r.add_argument("--image-format", choices=("png", "jpg"), default="png", help="image encoding (png: lossless)")
    r.add_argument("--skip-existing", action="store_true",
                   help="wds: leave shards that already exist untouched (a shard's name encodes every setting that "
                        "changes its content, so only shards identical to what would be rendered are skipped)")
    s = sub.add_parser("sheet", help="write a contact sheet PNG (RGB | depth | segmentation | keypoints)")
    _common(s, scenes=3)
    s.add_argument("--out", default="synthetic_contact_sheet.png",
                   help="PNG to write: a local path, file:///path.png or s3://bucket/key.png")
    s.add_argument("--scale", type=int, default=1, help="integer upscaling of each panel (>= 1)")


def _common(p: argparse.ArgumentParser, scenes: int) -> None:
    p.add_argument("--scenes", type=int, default=scenes, help=f"number of scenes (default {scenes})")
    p.add_argument("--views", type=int, default=4, help="cameras per scene (default 4)")
    p.add_argument("--size", type=int, default=128, help=f"square image size in pixels, 8..{MAX_IMAGE_SIDE} "
                                                         "(default 128)")
    p.add_argument("--seed", type=int, default=0, help="run seed; scene i uses SeedSequence([seed, i])")
    p.add_argument("--no-figures", action="store_true", help="objects only, no human figures")


MAX_VIEWS = 64  # cameras per scene; a sheet lays them side by side, so its width is bounded too
MAX_SHEET_SCENES = 64


def _check(args: argparse.Namespace) -> None:
    """Raise UsageError (exit 2, nothing rendered) for the first bad argument."""
    for name in ("scenes", "views", "size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if getattr(args, "first_scene", 0) < 0:
        raise UsageError(f"--first-scene must be >= 0, got {args.first_scene}")
    if getattr(args, "scenes_per_shard", 1) < 1:
        raise UsageError(f"--scenes-per-shard must be >= 1, got {args.scenes_per_shard}")
    if getattr(args, "scale", 1) < 1:
        raise UsageError(f"--scale must be a positive integer (panel upscaling), got {args.scale}")
    if args.views > MAX_VIEWS:
        raise UsageError(f"--views must be at most {MAX_VIEWS} cameras per scene, got {args.views}")
    if args.synth_command == "sheet" and args.scenes > MAX_SHEET_SCENES:
        raise UsageError(f"--scenes must be at most {MAX_SHEET_SCENES} for a contact sheet (one picture), got "
                         f"{args.scenes}; use `synth render` for more")
    scale = getattr(args, "scale", 1)  # sheet only
    if args.size * scale > MAX_IMAGE_SIDE:
        what = "--size x --scale" if scale > 1 else "--size"
        raise UsageError(f"{what} must be at most {MAX_IMAGE_SIDE} pixels, got {args.size * scale}")
    _check_out(args.out, folder=args.synth_command == "render")  # render writes files or shards into a folder


def _check_out(out: str, folder: bool) -> None:
    """--out must be usable before anything renders: not empty; a local folder output not a file; a local file
    output not a folder."""
    if not out.strip():
        raise UsageError("--out must name " + ("a folder" if folder else "a file") + ", got an empty string")
    if "://" in out and not out.startswith("file://"):
        return  # s3://: checked by Storage
    path = Path(out.removeprefix("file://")).expanduser().absolute()
    if folder and (problem := not_a_folder_problem(path)):
        raise UsageError(f"--out {problem}")
    if not folder and path.is_dir():
        raise UsageError(f"--out {path} is a folder: name the file to write, e.g. {path / 'out.png'}")
    if not folder and (problem := not_a_folder_problem(path.parent)):
        raise UsageError(f"--out {problem}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    try:  # SyntheticConfig checks --size/--views further (e.g. at least 8 pixels)
        config = resolve_config(views_per_scene=args.views, size=args.size, with_figures=not args.no_figures)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.synth_command == "sheet":
        from pipelines.contact_sheet import write_contact_sheet

        with step("write contact sheet", input=args.out):
            path = write_contact_sheet(args.out, seed=args.seed, scenes=args.scenes, views=args.views,
                                       size=args.size, scale=args.scale, with_figures=not args.no_figures)
        print(f"wrote {path}")
        return 0
    try:
        storage = as_storage(args.out)
    except StorageError as err:  # not a local path, file:// or s3:// URI
        raise UsageError(f"--out {err}") from None
    last = args.first_scene + args.scenes - 1
    output = f"{storage.root_uri}, seed {args.seed}, scenes {args.first_scene}..{last}"
    if args.format == "folder":
        samples = synthetic_samples(args.seed, args.scenes, config=config, first_scene=args.first_scene)
        with step("render samples", input=output), \
                tqdm(total=args.scenes * args.views, desc="synth render", unit="img") as progress:
            for sample in samples:
                write_sample_files(sample, storage, args.image_format)
                progress.update(1)
        print(f"wrote {args.scenes * args.views} samples to {storage.root_uri}")
        return 0
    with step("render shards", input=output):
        written = write_wds_shards(storage, args.seed, args.scenes, config, first_scene=args.first_scene,
                                   scenes_per_shard=args.scenes_per_shard, image_format=args.image_format,
                                   skip_existing=args.skip_existing)
    print(f"wrote {len(written)} shard(s) to {storage.root_uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="onegen synth", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_command("synth", run, parser.parse_args(argv))  # errors reported as `onegen synth` does


if __name__ == "__main__":
    sys.exit(main())
