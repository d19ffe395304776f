"""The build's per-record stages as plain functions: decode -> bucket -> conditions -> encode -> pack.

The Ray Data job (pipelines/build.py) runs each as an operator; the benchmark's bare loop runs the very same
functions in one process, so the two measure the same work. Every stage takes and returns a list of records
(pipelines/ingest.py) and never raises for one bad record: a record that fails is marked `dropped` with a named
reason (`error_<stage>` for an unexpected exception) and its message, and the rest of the batch goes on.

What each stage adds:

    decode      views[i]["sample"]: a validated `Sample` (decoded, upright, RGB; the synthetic world's come ready);
                record["sha256"]: the pixels' digest (of every view's digest for a group) — the duplicate key
    bucket      record["outputs"]: one per build resolution: {"resolution", "bucket": (h, w), "samples": [Sample]}
                (the release's centre crop + resize to the nearest aspect bucket, labels and cameras with it)
    conditions  outputs[k]["conditions"]: per view {modality: (H, W, 3) uint8}, outputs[k]["params"] (how each was
                drawn), outputs[k]["masks"] (per view the inpainting hole, or None)
    encode      outputs[k]["latents"]: onegen.shards latent entries (posterior mean/std of every view's picture
                and condition maps)
    pack        record["members"]: WebDataset sample dicts (bytes), record["rows"]: latent-table rows; pixels
                are dropped so only bytes travel to the writer
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from onegen.build_config import CONDITION_MODALITIES, LABEL_MODALITIES, BuildConfig
from onegen.shards import INPAINT_MASK_MEMBER, latent_entry, split_of
from pipelines.record import Sample, encode_png

IMAGE = "image"


def records_of(batch: dict[str, np.ndarray]) -> list[dict]:
    """A Ray Data batch's records. Records flow pickled in one column: they hold nested, ragged arrays that Arrow has
    no type for."""
    import pickle

    return [pickle.loads(blob) for blob in batch["record"]]


def batch_of(records: list[dict]) -> dict[str, np.ndarray]:
    import pickle

    out = np.empty(len(records), dtype=object)
    out[:] = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
    return {"record": out}


def timed_stage(name: str, records: list[dict], fn: Callable[[dict], None]) -> list[dict]:
    """Apply `fn` to each live record in place, timing it and turning an exception into a dropped record."""
    for record in records:
        if record["dropped"]:
            continue
        start = time.perf_counter()
        try:
            fn(record)
        except Exception as err:  # one bad sample never stops the build: counted under the stage's name
            from pipelines.decode import DropSample

            reason = err.reason if isinstance(err, DropSample) else f"error_{name}"
            drop(record, reason, f"{type(err).__name__}: {err}" if reason.startswith("error_") else str(err))
        add_seconds(record["timings"], name, start)
    return records


def add_seconds(timings: dict[str, float], name: str, start: float) -> None:
    """Add the seconds since `start` to `timings[name]` (a stage, or a part of one such as "conditions.canny")."""
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def drop(record: dict, reason: str, message: str) -> None:
    record["dropped"], record["error"] = reason, message
    for key in ("outputs", "members", "rows"):
        record.pop(key, None)
    record["views"] = [{"name": view.get("name")} for view in record["views"]]


def record_rng(cfg: BuildConfig, record_id: str, *salt: object) -> np.random.Generator:
    """A generator seeded by (run.seed, sample id, salt): conditions are identical on every rebuild and machine."""
    digest = hashlib.sha256(json.dumps([cfg.run.seed, record_id, *map(str, salt)]).encode()).digest()
    return np.random.default_rng(np.random.SeedSequence(list(np.frombuffer(digest[:16], dtype=np.uint32))))


# --- decode ------------------------------------------------------------------------------------------------------

def decode_record(cfg: BuildConfig, record: dict, built: np.ndarray | None = None) -> None:
    """Decode every view; `built` (an incremental build: pipelines.earlier's sorted digests of the earlier builds'
    pictures) drops a picture they already hold as `duplicate` (an identity group: once its pictures are final, in
    bucket_record). A picture of an identity group that cannot be read or decoded leaves the group instead."""
    from pipelines.decode import DropSample, decode_image, pixels_sha256

    limits = cfg.build.decode
    if not record["views"]:
        raise DropSample("no_image", "the source gave no image for this input")
    refused: dict[int, DropSample] = {}
    for v, view in enumerate(record["views"]):
        sample = view.get("sample")
        if sample is None:
            try:
                if "refused" in view:  # the source could not read it (pipelines/sources/folder.py)
                    raise DropSample(*view["refused"])
                image = decode_image(view["data"], view["name"], max_pixels=limits.max_pixels,
                                     min_size=limits.min_size, max_aspect=limits.max_aspect)
            except DropSample as err:
                if not is_identity(record):  # any other group needs every view (a multiview scene's cameras)
                    raise
                refused[v] = err
                continue
            sample = Sample(key=f"{record['id']}-v{v}", source=record["source"], image=image,
                            captions=dict(record["captions"]), camera=_camera(view.get("camera"), image.shape),
                            group=record["group_id"], meta={})
            view.pop("data")
        sample.validate()
        view["sample"] = sample
    if len(refused) == len(record["views"]):
        raise next(iter(refused.values()))
    leave_out(record, {v: (err.reason, str(err)) for v, err in refused.items()})
    record["view_sha256"] = [pixels_sha256(view["sample"].image) for view in record["views"]]
    record["sha256"] = group_sha256(record["view_sha256"])
    if not is_identity(record):
        drop_if_built(record, built)


def drop_if_built(record: dict, built: np.ndarray | None) -> None:
    """DropSample("duplicate") when an earlier build (build.previous) holds the record's pixels."""
    from pipelines.decode import DropSample
    from pipelines.earlier import already_built

    if built is not None and already_built(built, record["sha256"]):
        raise DropSample("duplicate", f"{record['input_id']}: an earlier build (build.previous) holds the same "
                                      f"pixels (sha256 {record['sha256'][:16]}...): a copy under another name")


def group_sha256(digests: list[str]) -> str:
    """A record's digest from its pictures' (the duplicate key): a single picture's own, else over them all."""
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()


# --- identity groups (pipelines/sources/folder.py's layout: identities; pipelines/faces.py) --------------------------

TOO_FEW_PICTURES = "too_few_pictures"  # the drop reason of an identity group left with fewer than faceid needs


def identity_views() -> tuple[int, int]:
    """(least, most) pictures of an identity group: model/tasks.py's faceid (a target and 1 to 4 references)."""
    from model.tasks import get_task

    task = get_task("faceid")
    return task.min_views, task.max_views


def is_identity(record: dict) -> bool:
    return record["meta"].get("identity") is not None


def leave_out(record: dict, left: dict[int, tuple[str, str]]) -> None:
    """Take pictures out of an identity group ({view: (reason, message)}) before bucketing: the views keep the
    others in order, the group's digest is taken over them again, and each picture left out is listed in
    meta["left_out"] as {"file", "reason", "message"} (the shard's JSON; counted per reason in the manifest).
    Raises too_few_message's DropSample when fewer pictures are left than the faceid task needs."""
    from pipelines.decode import DropSample

    if not left:
        return
    keep = [v for v in range(len(record["views"])) if v not in left]
    record["meta"]["left_out"] = record["meta"].get("left_out", []) + [
        {"file": record["views"][v]["name"], "reason": reason, "message": message}
        for v, (reason, message) in sorted(left.items())]
    record["views"] = [record["views"][v] for v in keep]
    if "view_sha256" in record:
        record["view_sha256"] = [record["view_sha256"][v] for v in keep]
        record["sha256"] = group_sha256(record["view_sha256"])
    if len(keep) < identity_views()[0]:
        raise DropSample(TOO_FEW_PICTURES, too_few_message(record, [], len(keep)))


def too_few_message(record: dict, leaving: list[str], kept: int) -> str:
    """Why an identity group has too few pictures: what left it (meta["left_out"], and the reasons of the pictures
    `leaving` it now), by reason, and the fix for each."""
    from collections import Counter

    fixes = {"no_face": "pictures where the face is clearly visible", "several_faces": "pictures of this person "
             "alone", "face_cropped": "pictures of the first one's shape (the group's bucket follows it)"}
    reasons = Counter([item["reason"] for item in record["meta"].get("left_out", [])] + leaving)
    wanted = sorted({fixes.get(reason, "pictures that decode (see their messages in the shard's stats)")
                     for reason in reasons})
    return (f"identity {record['meta']['identity']!r}: {kept} picture(s) kept, the faceid task needs "
            f"{identity_views()[0]} (left out: {', '.join(f'{n} {r}' for r, n in sorted(reasons.items()))}); add "
            + (" or ".join(wanted) or "pictures"))


def _camera(camera: dict | None, shape: tuple[int, ...]) -> dict | None:
    """A folder group's camera as a Sample camera (needs intrinsics K); c2w-only cameras stay in the record."""
    if not camera or camera.get("K") is None:
        return None
    c2w = np.asarray(camera["c2w_opengl"], dtype=np.float64)
    c2w_opencv = c2w @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenGL (y up, z back) -> OpenCV (y down, z forward)
    return {"K": np.asarray(camera["K"], dtype=np.float64), "c2w_opengl": c2w, "w2c_opencv": np.linalg.inv(c2w_opencv),
            "width": int(shape[1]), "height": int(shape[0])}


# --- bucket ------------------------------------------------------------------------------------------------------

def bucket_record(cfg: BuildConfig, record: dict, built: np.ndarray | None = None) -> None:
    """Every resolution's bucket; an identity group's pictures are final here (the faces stage ran), so its
    duplicate check against the earlier builds (`built`) is made now."""
    from pipelines.bucket import bucket_for, bucket_sample

    if is_identity(record):
        drop_if_built(record, built)
    samples = [view["sample"] for view in record["views"]]
    record["outputs"] = []
    for resolution in cfg.build.resolutions:
        height, width = bucket_for(samples[0].image.shape[:2], resolution)  # a group shares its first view's bucket
        record["outputs"].append({"resolution": resolution, "bucket": (height, width),
                                  "samples": [bucket_sample(s, height, width) for s in samples]})
    for view in record["views"]:
        view.pop("sample")  # the full-size pictures are not needed any more: keep records small between stages


# --- conditions --------------------------------------------------------------------------------------------------

def conditions_record(cfg: BuildConfig, record: dict) -> None:
    """The weight-free conditions (canny, blur, inpaint) of every view, each kind from its own generator seeded by
    (run.seed, id, resolution, view, kind), so a rebuild is byte-identical and turning one kind off changes no other;
    then the maps of the pictures' labels, the source's exact ones or the labellers' (drawn by the same renderers).
    Every map is stored under its modality (model/tasks.py's role)."""
    from model import conditions as render

    settings = cfg.build.conditions
    wanted = label_maps_wanted(cfg, record)
    for output in record["outputs"]:
        output["conditions"], output["params"], output["masks"] = [], [], []
        for v, sample in enumerate(output["samples"]):
            maps: dict[str, np.ndarray] = {}
            params: dict[str, Any] = {}
            mask = None
            rng = partial(record_rng, cfg, record["id"], output["resolution"], v)  # rng(kind): one per kind
            clock = partial(add_seconds, record["timings"])  # clock(part, start): the part's share of the stage
            if "canny" in settings.kinds:
                start, draw = time.perf_counter(), rng("canny")
                low = int(draw.integers(settings.canny_low[0], settings.canny_low[1] + 1))
                high = int(draw.integers(settings.canny_high[0], settings.canny_high[1] + 1))
                maps[CONDITION_MODALITIES["canny"]] = render.canny_map(sample.image, low, high)
                params["canny"] = [low, high]
                clock("conditions.canny", start)
            if "blur" in settings.kinds:
                start = time.perf_counter()
                blurred, sigma, ksize = render.blur_image(sample.image, rng("blur"), settings.blur_sigma,
                                                          settings.blur_kernel)
                maps[CONDITION_MODALITIES["blur"]] = blurred
                params["blur_sigma"], params["blur_kernel"] = sigma, ksize
                clock("conditions.blur", start)
            if "inpaint" in settings.kinds:
                start = time.perf_counter()
                mask = render.inpaint_mask(sample.image.shape[:2], rng("inpaint"), *settings.inpaint_fraction,
                                           shapes=settings.inpaint_shapes)
                maps[CONDITION_MODALITIES["inpaint"]] = render.masked_image(sample.image, mask)
                params["inpaint_fraction"] = float(mask.mean())
                clock("conditions.inpaint", start)
            start = time.perf_counter()
            maps.update(_exact_maps(sample, wanted, render))
            inverse = output.get("inverse_depth", {}).get(v)  # the depth labeller's (pipelines/depth_estimation.py)
            if inverse is not None:
                maps[LABEL_MODALITIES["depth"]] = render.inverse_depth_condition(inverse)
            if set(maps) - set(CONDITION_MODALITIES.values()):
                clock("conditions.labels", start)
            output["conditions"].append(maps)
            output["params"].append(params)
            output["masks"].append(mask)
        output.pop("inverse_depth", None)  # drawn: keep the records that travel on small


def label_maps_wanted(cfg: BuildConfig, record: dict) -> set[str]:
    """Which maps a record's labels are drawn as: the source's exact labels build.conditions.synthetic_maps; segments
    the segmentation labeller found (pipelines/segmentation.py) build.segmentation.maps."""
    wanted = set(cfg.build.conditions.synthetic_maps)
    labels = record.get("labels", {})
    if labels.get("segmentation") == "ok":  # pipelines.labelers.OK (that module imports this one)
        wanted = (wanted - {"semantic", "boxes"}) | set(cfg.build.segmentation.maps)
    if labels.get("pose") == "ok":  # people the pose labeller found (pipelines/pose.py)
        wanted |= {"pose"}
    return wanted


def _exact_maps(sample: Sample, wanted: set[str], render) -> dict[str, np.ndarray]:
    """The condition maps a picture's labels allow (the synthetic world has them all; the segmentation labeller
    gives semantic and boxes)."""
    maps: dict[str, np.ndarray] = {}
    height, width = sample.image.shape[:2]
    colours = class_colours(sample)
    if "depth" in wanted and sample.depth is not None:
        maps[LABEL_MODALITIES["depth"]] = render.depth_condition(sample.depth)
    if "semantic" in wanted and sample.semantic is not None and sample.classes is not None and colours:
        maps[LABEL_MODALITIES["semantic"]] = render.semantic_condition(sample.semantic, sample.classes,
                                                                       {c: v["hex"] for c, v in colours.items()})
    if "pose" in wanted and sample.keypoints is not None and (sample.keypoints[..., 2] > 0).any():
        maps[LABEL_MODALITIES["pose"]] = render.pose_condition((height, width), sample.keypoints)
    if "boxes" in wanted and sample.entities and colours:
        boxed = [e for e in visible_entities(sample) if e["class"] in colours]
        if boxed:
            maps[LABEL_MODALITIES["boxes"]] = render.box_condition((height, width), [e["bbox_2d"] for e in boxed],
                                                                   [colours[e["class"]]["hex"] for e in boxed])
    return maps


def class_colours(sample: Sample) -> dict[str, dict[str, str]]:
    """{class: {"name", "hex"}}: the prompt colours a source assigned (the synthetic world's meta.prompts)."""
    return dict(sample.meta.get("prompts", {}).get("class_colours", {}))


def visible_entities(sample: Sample) -> list[dict]:
    return [e for e in sample.entities or () if e.get("visible", True) and e.get("bbox_2d") is not None]


# --- encode ------------------------------------------------------------------------------------------------------

class ViewEncoder:
    """Every picture and condition map of a batch of records through the image tokenizer, batched by size.

    Stateful (holds the tokenizer), so the job runs it as a Ray Data actor; `encode_records` works in-process."""

    def __init__(self, cfg: BuildConfig, device: str | None = None, revision: str | None = None):
        import torch

        from model.tokenizers import load_image_tokenizer

        self.cfg = cfg
        encode = cfg.build.encode
        self.device = device or ("cuda" if encode.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device == "cuda" else None
        self.tokenizer = load_image_tokenizer(encode.image_tokenizer, torch_dtype=dtype,
                                              revision=revision).to(self.device)
        if encode.compile and hasattr(self.tokenizer, "vae"):
            self.tokenizer.vae.encoder = torch.compile(self.tokenizer.vae.encoder)
        self.identity = tokenizer_identity(encode.image_tokenizer, revision)

    def encode_records(self, records: list[dict]) -> list[dict]:
        live = [r for r in records if not r["dropped"]]
        for record in live:
            record["tokenizer"] = {"id": self.identity[0], "sha": self.identity[1],
                                   "downsample_factor": int(self.tokenizer.downsample_factor)}
        start = time.perf_counter()
        try:
            self._encode(live)
            spent = (time.perf_counter() - start) / max(1, len(live))
            for record in live:
                record["timings"]["encode"] = record["timings"].get("encode", 0.0) + spent
        except Exception:  # isolate the record that fails; the others are encoded one by one
            for record in live:
                timed_stage("encode", [record], lambda r: self._encode([r]))
        return records

    def _encode(self, records: list[dict]) -> None:
        import torch

        jobs: dict[tuple[int, int], list[tuple[dict, int, str, np.ndarray]]] = {}
        for record in records:
            for output in record["outputs"]:
                output["latents"] = []
                for v, sample in enumerate(output["samples"]):
                    pictures = {IMAGE: sample.image, **output["conditions"][v]}
                    for modality, picture in pictures.items():
                        jobs.setdefault(picture.shape[:2], []).append((output, v, modality, picture))
        batch_size = self.cfg.build.encode.batch_size
        dtype = self.cfg.build.encode.latent_dtype
        for items in jobs.values():
            for first in range(0, len(items), batch_size):
                chunk = items[first:first + batch_size]
                pixels = torch.from_numpy(np.stack([item[3] for item in chunk])).permute(0, 3, 1, 2)
                images = pixels.float().div_(127.5).sub_(1.0)  # uint8 -> [-1, 1], the tokenizers' convention
                with torch.inference_mode():
                    mean, std = self.tokenizer.encode_posterior(images.to(self.device))
                mean = mean.float().cpu().numpy()
                std = None if std is None else std.float().cpu().numpy()
                for i, (output, v, modality, _) in enumerate(chunk):
                    output["latents"].append(latent_entry(v, modality, mean[i], None if std is None else std[i],
                                                          dtype))
        for record in records:
            for output in record["outputs"]:
                output["latents"].sort(key=lambda e: (e["view"], e["modality"] != IMAGE, e["modality"]))


def check_image_tokenizer(cfg: BuildConfig) -> str | None:
    """Load the configured tokenizer once on the driver, before anything is planned or written: a missing or wrong
    VAE id fails the build in seconds with one line naming the key and the fix, not in every encoder actor after
    the sources were read. Returns the commit a hub id resolved to (None for a local folder or 'pixel'): the
    encoder actors load that very commit, so every shard of a build is encoded by one VAE even if the hub repo moves
    while the build runs (each node downloads it into its own cache)."""
    spec = cfg.build.encode.image_tokenizer
    if spec == "pixel":
        return None
    from pathlib import Path

    from model.hub import resolve_pretrained_folder
    from model.tokenizers import load_image_tokenizer
    from onegen.build_config import tokenizer_factor_problem
    from onegen.errors import UsageError, first_line

    source, revision = spec, None
    try:
        if not Path(spec).exists():  # a hub id: one snapshot (download or cache), loaded from its folder below
            folder = resolve_pretrained_folder(spec, allow_patterns=["vae/*"])
            source, revision = str(folder), folder.name  # the cache's snapshots/<commit>
        tokenizer = load_image_tokenizer(source)
    except (OSError, ValueError, ImportError) as err:
        raise UsageError(f"build.encode.image_tokenizer={spec!r}: cannot load it ({first_line(err)}); set it to "
                         "'pixel', a local AutoencoderKL folder (config.json + weights, or a release root with vae/) "
                         "or a hub id (downloaded on first use, or read from the local Hugging Face cache offline)") \
            from None
    problem = tokenizer_factor_problem(spec, int(tokenizer.downsample_factor))
    if problem:
        raise UsageError(f"build.encode.image_tokenizer: {problem}")
    return revision


def tokenizer_identity(spec: str, revision: str | None = None) -> tuple[str, str]:
    """(tokenizer id, sha256 of its config): which tokenizer made a shard's latents, for readers to check. A hub id
    is recorded with the commit it was loaded at (`owner/name@commit`)."""
    from pathlib import Path

    if spec == "pixel":
        return "pixel", hashlib.sha256(b"PixelTokenizer(scale=2.0)").hexdigest()
    folder = Path(spec)
    if not folder.exists():  # a hub id, loaded just before at `revision`: its cached snapshot, no network
        from model.hub import resolve_pretrained_folder

        folder = resolve_pretrained_folder(spec, allow_patterns=["vae/*"], revision=revision, local_files_only=True)
        spec = f"{spec}@{revision or folder.name}"
    for config in (folder / "vae" / "config.json", folder / "config.json"):  # the loader prefers vae/ too
        if config.is_file():
            return spec, hashlib.sha256(config.read_bytes()).hexdigest()
    return spec, ""


# --- pack --------------------------------------------------------------------------------------------------------

def pack_members(cfg: BuildConfig, record: dict) -> None:
    """WebDataset members (the PNGs of every picture and condition map, the metadata) and the latent rows without
    their latents: packing's CPU-heavy half, done before the encode stage, so the job runs it in the partition tasks
    (many) rather than the encoder actors (few), and the encoder's output goes straight to the driver instead of
    through another task (records are ~10 MB once they hold float latents; every hop between Ray workers copies
    them several times)."""
    record["members"], record["rows"] = [], []
    # A person keeps one split whatever pictures their folder holds (its input id, hence its sample id, changes
    # with them): build after build, the same person never lands in train and heldout.
    split = split_of(f"{record['source']}/identity/{record['meta']['identity']}" if is_identity(record)
                     else record["id"], cfg.build.heldout_fraction)
    captions = [{"name": name, "text": text, "origin": "source"} for name, text in sorted(record["captions"].items())]
    generated = record.get("label_values", {}).get("caption")  # the caption labeler's (pipelines/caption.py)
    if generated:
        captions.append({"name": cfg.build.caption.name, "text": generated, "origin": "generated"})
    for output in record["outputs"]:
        resolution, (height, width) = output["resolution"], output["bucket"]
        modalities: set[str] = set()
        entities, cameras = [], []
        for v, sample in enumerate(output["samples"]):
            sample.meta = {**sample.meta, "build": {
                "id": record["id"], "input_id": record["input_id"], "resolution": resolution, "view": v,
                "split": split, "params": output["params"][v], **record["meta"],
                **({"captions": captions, "labels": record["labels"], "labelled_by": record.get("labelled_by", {})}
                   if record.get("labels") else {})}}
            members = sample.to_wds()
            members["__key__"] = f"{record['id']}-r{resolution}-v{v}"
            for modality, picture in sorted(output["conditions"][v].items()):
                members[f"cond_{modality}.png"] = encode_png(picture)  # "semantic.png" is the id map
            if output["masks"][v] is not None:  # the hole itself (255 = masked): evaluation and tests need it
                members[INPAINT_MASK_MEMBER] = encode_png(output["masks"][v].astype(np.uint8) * 255)
            record["members"].append(members)
            modalities |= {IMAGE, *output["conditions"][v]}
            colours = class_colours(sample)
            entities += [{"view": v, "id": int(e["id"]), "class": e["class"],
                          "colour": colours.get(e["class"], {}).get("name"),
                          "hex": colours.get(e["class"], {}).get("hex"), "label": e["class"],
                          "box": [float(x) for x in e["bbox_2d"]]} for e in visible_entities(sample)]
            camera = sample.camera or record["views"][v].get("camera")
            if camera:
                cameras.append({"view": v, "c2w_opengl": np.asarray(camera["c2w_opengl"], float).ravel().tolist(),
                                "K": None if camera.get("K") is None or sample.camera is None
                                else np.asarray(sample.camera["K"], float).ravel().tolist()})
        first = output["samples"][0]
        record["rows"].append({
            "id": record["id"], "group_id": record["group_id"], "source": record["source"],
            "input_id": record["input_id"], "sha256": record["sha256"], "split": split,
            "resolution": resolution, "bucket_h": height, "bucket_w": width, "num_views": len(output["samples"]),
            "modalities": sorted(modalities), "latents": None,
            "captions": captions,
            "class_colours": json.dumps(class_colours(first), sort_keys=True),
            "entities": entities, "cameras": cameras,
            "params": json.dumps(output["params"], sort_keys=True),
            "text_tokenizer": None,
        })
    record["views"] = [{"name": view.get("name"), "camera": view.get("camera")} for view in record["views"]]


def pack_latents(record: dict) -> None:
    """The latents (and the tokenizer that made them) into the rows pack_members left; the pictures are dropped."""
    for row, output in zip(record["rows"], record.pop("outputs"), strict=True):
        row.update(latents=output["latents"], image_tokenizer=record["tokenizer"]["id"],
                   image_tokenizer_sha=record["tokenizer"]["sha"],
                   downsample_factor=record["tokenizer"]["downsample_factor"])


# --- the chain: its order, once (the build's Ray operators run its parts; process_records all of it) ---------------

WEIGHT_FREE_STAGES = ("decode", "bucket", "conditions", "pack")  # "pack": its members, before the latents


def stage_chain(labelers=()) -> list:
    """The chain's order: runs of weight-free stages (tuples of names) with the labelers between them (in their
    build order). A labeler that `sees` "decoded" runs after decode on the full-size pictures (pose, faces: their
    keypoints and boxes are then bucketed with the picture, as a source's are, and the faces stage can leave a
    picture out of its group before the group's bucket is chosen); the others after bucket, on each resolution's
    pictures. Every labeler comes before conditions: its labels can become condition maps."""
    chain: list = []
    for step in [("decode",), *[l for l in labelers if l.sees == "decoded"], ("bucket",),
                 *[l for l in labelers if l.sees != "decoded"], ("conditions", "pack")]:
        if isinstance(step, tuple) and chain and isinstance(chain[-1], tuple):
            chain[-1] += step
        else:
            chain.append(step)
    return chain


def run_stages(stages: tuple[str, ...], records: list[dict], cfg: BuildConfig,
               built: np.ndarray | None = None) -> list[dict]:
    """Weight-free stages over records in this process, in order. `built` (decode, incremental builds): the earlier
    builds' picture digests."""
    steps = {"decode": lambda record: decode_record(cfg, record, built),
             "bucket": lambda record: bucket_record(cfg, record, built),
             "conditions": lambda record: conditions_record(cfg, record),
             "pack": lambda record: pack_members(cfg, record)}
    for stage in stages:
        records = timed_stage(stage, records, steps[stage])
    return records


def encode_and_finish(encoder: ViewEncoder, records: list[dict]) -> list[dict]:
    """The encode stage, then the latents into the rows (pack's second half)."""
    return timed_stage("pack", encoder.encode_records(records), pack_latents)


def process_records(cfg: BuildConfig, records: list[dict], encoder: ViewEncoder, labelers=()) -> list[dict]:
    """The whole chain in one process (tests, the benchmark's bare loop). `labelers`:
    pipelines.labelers.LabelerStage instances (the enabled ones, in build order)."""
    for step in stage_chain(labelers):
        if isinstance(step, tuple):
            run_stages(step, records, cfg)
        else:
            step.label_records(records)
    return encode_and_finish(encoder, records)
