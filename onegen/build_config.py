"""`onegen build`'s config schema: the shared sections plus `build:` (sources, stages, encoders, output).

Roles (onegen.config): what changes output bytes is content and gates "changed config" refusals of a build name
(sources, resolutions, limits, condition settings, tokenizer, latent dtype, seed); how the job runs is runtime
(batch sizes, concurrency, CPUs/GPUs per stage, download threads), so a build resumes on a bigger cluster. Where
the inputs sit (folder paths, url-list files, tar paths) is a machine field: what a build holds is fixed by its
frozen plan (pipelines/build.py), not by where its first run found the inputs.

    build:
      name: web-2026-12            # output: <storage.root>/builds/NAME/
      resolutions: [256, 512]      # one latent row per (sample, resolution): the release's aspect buckets
      sources:
        - {name: web, type: urls, files: [urls.parquet]}
        - {name: photos, type: folder, path: s3://bucket/photos}
        - {name: old, type: webdataset, paths: [s3://bucket/img2dataset-out/]}
        - {name: synth, type: synthetic, scenes: 64}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from model.limits import BUCKET_MULTIPLE, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, resolution_problem
from onegen.config import (MACHINE, RUNTIME, SCHEMAS, OnegenConfig, _hashed_if_set, _role, _Section,
                           check_safe_name, image_tokenizer_factor)

_NAME_PATTERN = r"^[a-z0-9][a-z0-9_]*$"  # source names become shard names "NAME-00000": no '-' or '.' inside
CONDITION_KINDS = ("canny", "blur", "inpaint")
SYNTHETIC_MAPS = ("depth", "semantic", "pose", "boxes")
# The shard modality (the view role of model/tasks.py it fills, onegen.shards.MODALITIES) each config kind writes.
CONDITION_MODALITIES = {"canny": "canny", "blur": "blurred_image", "inpaint": "masked_image"}
LABEL_MODALITIES = {"depth": "depth", "semantic": "semantic_map", "pose": "pose", "boxes": "bounding_boxes"}
MASK_SHAPES = ("rectangle", "rectangles", "strokes")  # model.conditions.MASK_SHAPES (a test holds them equal)


class _Source(_Section):
    name: str = Field(pattern=_NAME_PATTERN, description="names the source's shards (NAME-00000) and its samples")
    partition_size: int = Field(256, gt=0, description="inputs per partition = per shard (one Ray task reads it)")


class UrlSource(_Source):
    type: Literal["urls"]
    files: list[str] = Field([], description="parquet / csv / tsv / txt url lists (local or s3://)",
                             **_role(MACHINE))
    path: str | None = Field(None, min_length=1, description="one more url list, or a folder / s3:// prefix whose "
                                                            "url lists are all read (sorted)", **_role(MACHINE))
    url_col: str = "url"
    caption_col: str | None = "caption"
    timeout_s: float = Field(10.0, gt=0, description="img2dataset's per-request timeout")
    retries: int = Field(1, ge=0, description="img2dataset's retries per URL")
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = Field(
        "no", description="img2dataset resizing before the build's own bucketing; 'no' keeps the original bytes")
    image_size: int = Field(1024, gt=0, le=MAX_IMAGE_SIDE, description="img2dataset's target size when "
                                                                      "resize_mode is not 'no'")
    threads: int = Field(16, gt=0, description="download threads per partition task", **_role(RUNTIME))

    @model_validator(mode="after")
    def _some_list(self) -> "UrlSource":
        if not self.lists:
            raise ValueError(f"source {self.name!r}: name its url lists: files: [a.parquet, ...] or path: FILE_OR_DIR")
        return self

    @property
    def lists(self) -> list[str]:
        """`files`, then `path`: what the source reads, in order."""
        return [*self.files, *([self.path] if self.path else [])]


class FolderSource(_Source):
    type: Literal["folder"]
    path: str = Field(min_length=1, description="local folder or s3://bucket/prefix; sidecar .txt/.json captions, "
                                                "multiview groups as folders with cameras.json", **_role(MACHINE))
    layout: Literal["files", "identities"] = Field(
        "files", description="files: every image one sample (cameras.json folders: multiview groups); identities: "
                             "every sub-folder directly under path is one person, a faceid group of its images "
                             "(2 to 5 with a face, build.faces finds them)", **_hashed_if_set())


class WebDatasetSource(_Source):
    type: Literal["webdataset"]
    paths: list[str] = Field(min_length=1, description="tar files, folders of tars, {000..009} ranges or globs "
                                                       "(local or s3://); one tar is one partition",
                             **_role(MACHINE))

    @model_validator(mode="after")
    def _one_tar_one_partition(self) -> "WebDatasetSource":
        if "partition_size" in self.model_fields_set:
            raise ValueError(f"source {self.name!r}: a webdataset source reads one tar per partition (shards keep "
                             "the tars' cut); remove partition_size")
        return self


class SyntheticSource(_Source):
    type: Literal["synthetic"]
    partition_size: int = Field(8, gt=0, description="scenes per partition")
    scenes: int = Field(16, gt=0)
    views_per_scene: int = Field(1, gt=0, description="> 1: multiview groups (one row per scene)")
    size: int = Field(256, gt=0, le=MAX_IMAGE_SIDE, description="render size in pixels (square)")
    with_figures: bool | None = Field(None, description="people in the scenes (pose labels); null: the world's "
                                                        "default")
    seed: int | None = Field(None, description="null: run.seed")


Source = Annotated[UrlSource | FolderSource | WebDatasetSource | SyntheticSource, Field(discriminator="type")]


class DecodeSection(_Section):
    min_size: int = Field(64, gt=0, le=MAX_IMAGE_SIDE, description="smaller side below this: dropped as too_small")
    max_aspect: float = Field(4.0, ge=1.0, description="long/short side above this: dropped as bad_aspect (the "
                                                       "buckets end at 4:1)")
    max_pixels: int = Field(MAX_IMAGE_PIXELS, gt=0, description="width*height above this: dropped as too_large "
                                                                "before decoding (PIL's decompression-bomb limit)")


class ConditionsSection(_Section):
    """Weight-free conditions, each drawn per sample from a generator seeded by (run.seed, sample id, resolution,
    view, kind): a rebuild is byte-identical, another run.seed draws other thresholds, blurs and holes. A range
    (low, high) is drawn uniformly per sample; give one number (or low == high) to fix it."""

    kinds: list[Literal["canny", "blur", "inpaint"]] = Field(list(CONDITION_KINDS))
    canny_low: tuple[int, int] = Field((80, 120), description="cv2.Canny's low hysteresis threshold range (ControlNet "
                                                              "1.1 draws random thresholds: varied edge density)")
    canny_high: tuple[int, int] = Field((160, 240), description="the high threshold range; starts at or above "
                                                                "canny_low's end")
    blur_sigma: tuple[float, float] = Field((1.0, 3.0), description="Gaussian sigma range (deblurring)")
    blur_kernel: tuple[int, int] | None = Field((7, 21), description="odd Gaussian kernel size range (the "
                                                                     "Real-ESRGAN recipe); null: 6 sigma + 1")
    inpaint_fraction: tuple[float, float] = Field((0.1, 0.5), description="masked area range (inpainting)")
    inpaint_shapes: list[Literal["rectangle", "rectangles", "strokes"]] = Field(
        list(MASK_SHAPES), min_length=1, description="hole shapes drawn from: one rectangle, 2-4 rectangles, or "
                                                     "rectangles + thick free-form strokes")
    synthetic_maps: list[Literal["depth", "semantic", "pose", "boxes"]] = Field(
        list(SYNTHETIC_MAPS), description="exact maps drawn from the synthetic world's labels")

    @field_validator("canny_low", "canny_high", "blur_sigma", "blur_kernel", mode="before")
    @classmethod
    def _one_number_is_a_fixed_range(cls, value):
        return [value, value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class EncodeSection(_Section):
    image_tokenizer: str = Field("pixel", min_length=1, description="'pixel' (exact space-to-depth) or an "
                                                                    "AutoencoderKL hub id / local folder")
    latent_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(16, gt=0, description="views per tokenizer call", **_role(RUNTIME))
    concurrency: int = Field(1, gt=0, description="encoder actors", **_role(RUNTIME))
    num_gpus: float = Field(0.0, ge=0, description="GPUs per encoder actor (> 0: bf16 on the GPU)",
                            **_role(RUNTIME))
    num_cpus: float = Field(0.5, gt=0, description="CPUs per encoder actor (2-core machines: <= 0.5, or the "
                                                   "actor holds a CPU the readers need)", **_role(RUNTIME))
    compile: bool = Field(False, description="torch.compile the VAE encoder (GPU)", **_role(RUNTIME))


def tokenizer_factor_problem(spec: str, factor: int | None) -> str | None:
    """Why a tokenizer that downsamples by `factor` cannot encode the aspect buckets (sides are multiples of
    BUCKET_MULTIPLE pixels, which must fill whole 2x2 latent patches), or None. Checked on the config (the factor
    read without loading) and again by the build once it has loaded the tokenizer."""
    if not factor or BUCKET_MULTIPLE % (factor * 2) == 0:
        return None
    return (f"{spec!r} downsamples by {factor}, but the aspect buckets are multiples of {BUCKET_MULTIPLE} pixels, "
            f"which fill whole 2x2 latent patches only for a factor of at most {BUCKET_MULTIPLE // 2}; use an f=8 "
            "AutoencoderKL (SD3/FLUX class) or 'pixel'")


DEFAULT_CAPTION_MODEL = "llava-hf/llama3-llava-next-8b-hf"  # the release demo's captioner (ONEDIFFUSION_SPEC §6)
DEFAULT_CAPTION_INSTRUCTION = "Describe the contents of the photo in 150 words or fewer."


class LabelerSection(_Section):
    """What every model stage (a labeler) shares: on or off, which weights, and how its Ray Data actor pool runs.
    The model is loaded once per actor; a preflight task on the same resources resolves it before any input is
    read (pipelines/labelers.py)."""

    enabled: bool = Field(False, description="run this labeler in the build")
    model: str = Field(min_length=1, description="hub id 'owner/name' (downloaded on first use, or read from the "
                                                 "local Hugging Face cache offline) or a local folder")
    revision: str | None = Field(None, min_length=1, description="hub branch, tag or commit (null: main, pinned to "
                                                                 "its commit when the build starts)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU, float32 on CPU")
    batch_size: int = Field(4, gt=0, description="samples per model call", **_role(RUNTIME))
    concurrency: int = Field(1, gt=0, description="actors (model copies)", **_role(RUNTIME))
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor", **_role(RUNTIME))
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor", **_role(RUNTIME))
    preflight_timeout_s: float = Field(300.0, gt=0, description="how long the start-up check may wait for a node "
                                                                "with the actor's resources (and a download)",
                                       **_role(RUNTIME))


class CaptionSection(LabelerSection):
    """The caption labeler: a transformers image-text-to-text model with a chat template describes each sample (a
    group: its first view), greedy decoding; the caption is kept beside the source's own, origin `generated`."""

    model: str = Field(DEFAULT_CAPTION_MODEL, min_length=1, description="an image-text-to-text model with a chat "
                                                                        "template: hub id or local folder")
    backend: Literal["transformers"] = Field("transformers", description="transformers' generate() on the actor "
                                                                         "pool")
    instruction: str = Field(DEFAULT_CAPTION_INSTRUCTION, min_length=1, description="the user turn after the image")
    max_new_tokens: int = Field(200, gt=0, description="token budget per caption (a caption that reaches it is "
                                                       "kept and counted as `truncated`)")
    name: str = Field("vlm", pattern=_NAME_PATTERN, description="the caption's name in the rows (origin: generated)")


DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Large-hf"  # the release's depth labeller (SPEC §6)
DEFAULT_SEGMENTATION_MODEL = "facebook/mask2former-swin-large-coco-panoptic"


class DepthSection(LabelerSection):
    """The depth labeller: a transformers depth-estimation model (AutoModelForDepthEstimation: Depth Anything V2,
    DPT, ZoeDepth, ...) estimates every picture that has no depth of its own; drawn as the depth condition map
    (model/depth.py: inverse depth, min-max normalised per image, near = white)."""

    model: str = Field(DEFAULT_DEPTH_MODEL, min_length=1, description="a depth-estimation model: hub id or local "
                                                                      "folder")
    output: Literal["auto", "inverse", "metric"] = Field(
        "auto", description="what the model predicts: auto reads it from its config (Depth Anything: its "
                            "depth_estimation_type; DPT: relative inverse depth; ZoeDepth, GLPN, Depth Pro: metric "
                            "depth); inverse or metric for others")


class SegmentationSection(LabelerSection):
    """The segmentation labeller: a transformers universal-segmentation model (Mask2Former, MaskFormer, OneFormer;
    panoptic post-processing) finds up to max_entities segments per picture that has no entities of its own; each
    class gets a random palette colour seeded per sample, drawn as the semantic map and the box map with their
    `<#RRGGBB name mask: label>` / `boundingbox` prompts."""

    model: str = Field(DEFAULT_SEGMENTATION_MODEL, min_length=1, description="a universal-segmentation model: hub id "
                                                                             "or local folder")
    threshold: float = Field(0.5, ge=0, le=1, description="a segment's least class score")
    mask_threshold: float = Field(0.5, ge=0, le=1, description="mask probability above which a pixel belongs to it")
    overlap_threshold: float = Field(0.8, ge=0, le=1, description="least share of a mask left after overlaps")
    max_entities: int = Field(10, ge=1, le=20, description="segments kept per picture, largest first (the paper's "
                                                           "<= 10 entities); a sample keeps its 20 largest classes "
                                                           "(one palette colour each)")
    min_area: float = Field(0.001, ge=0, lt=1, description="segments smaller than this share of the picture are "
                                                           "left out")
    maps: list[Literal["semantic", "boxes"]] = Field(["semantic", "boxes"], min_length=1,
                                                     description="condition maps drawn from the segments")


class _BundledModelSection(LabelerSection):
    """A labeller on a model shipped inside a package (mediapipe's): no hub revision, no torch dtype, light on CPU."""

    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor (mediapipe's models are light)",
                            **_role(RUNTIME))

    @model_validator(mode="after")
    def _no_hub_settings(self) -> "_BundledModelSection":
        if self.revision is not None or self.dtype != "auto":
            raise ValueError("mediapipe's bundled models have no hub revision and run in float32: leave revision and "
                             "dtype out")
        return self


class PoseSection(_BundledModelSection):
    """The pose labeller: mediapipe's pose landmarker (bundled in its wheel: offline) finds the people of every
    picture without keypoints of its own, up to max_people; their 33 landmarks become COCO-17 keypoints, drawn as the
    OpenPose-coloured skeleton of the pose task. A picture without a person gets no pose map (counted)."""

    backend: Literal["mediapipe"] = Field("mediapipe", description="mediapipe: the legacy solution's full landmark "
                                                                   "model, offline (a person detector + ViTPose "
                                                                   "backend through transformers may follow)")
    model: str = Field("pose_landmark_full", min_length=1, description="the backend's model: mediapipe ships "
                                                                       "pose_landmark_full in its wheel")
    min_confidence: float = Field(0.5, ge=0, le=1, description="the person detector's least score")
    min_visibility: float = Field(0.5, ge=0, le=1, description="a landmark less visible than this is left out (COCO "
                                                               "v = 0), else v = 2")
    max_people: int = Field(4, ge=1, le=20, description="people looked for per picture")


class FacesSection(_BundledModelSection):
    """The face labeller: mediapipe's face detector (bundled in its wheel: offline) boxes the faces of every picture
    (kept in its metadata); in an identity group (a folder source with layout: identities) a picture without exactly
    one face leaves the group (counted), and a group left with fewer than 2 pictures is dropped."""

    backend: Literal["mediapipe"] = Field("mediapipe", description="mediapipe's BlazeFace detector, offline")
    model: Literal["face_detection_full_range", "face_detection_short_range"] = Field(
        "face_detection_full_range", description="full range: faces up to ~5 m away (photographs); short range: "
                                                 "faces within ~2 m (selfies)")
    min_confidence: float = Field(0.5, ge=0, le=1, description="a face's least detection score")


class StagesSection(_Section):
    """How the weight-free stages run (Ray Data tasks): never changes output bytes."""

    batch_size: int = Field(8, gt=0, description="records per slice of a partition through the weight-free stages, "
                                                 "and per encoder batch")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per partition task (read, decode, bucket, conditions, PNGs; "
                                                   "fractions let the encoder actor and the tasks share a 2-core "
                                                   "machine without stalling)")


class BuildSection(_Section):
    name: str | None = Field(None, description="output folder builds/NAME; null: run.name", **_role(RUNTIME))
    sources: list[Source] = Field(min_length=1)
    resolutions: list[int] = Field([256], min_length=1, description="the release's 256 / 512 / 1024 buckets, or "
                                   "another multiple of 16 (e.g. 64 for tests: the 512 table scaled)")
    heldout_fraction: float = Field(0.0, ge=0, le=1, description="stable fraction of ids in the heldout split")
    previous: list[str] = Field([], description="earlier builds (names under storage.root, or build URIs) whose "
                                "inputs this build leaves out and whose pictures it drops as `duplicate`: an "
                                "incremental build. Frozen into the plan on the first run", **_role(MACHINE))
    decode: DecodeSection = DecodeSection()
    conditions: ConditionsSection = ConditionsSection()
    encode: EncodeSection = EncodeSection()
    caption: CaptionSection = CaptionSection()
    depth: DepthSection = DepthSection()
    segmentation: SegmentationSection = SegmentationSection()
    pose: PoseSection = PoseSection()
    faces: FacesSection = FacesSection()
    stages: StagesSection = Field(StagesSection(), **_role(RUNTIME))

    _safe_name = field_validator("name")(check_safe_name)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, value: list) -> list:
        names = [source.name for source in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"source names must be unique (they name the shards), repeated: {repeated}")
        return value

    @field_validator("resolutions")
    @classmethod
    def _unique_resolutions(cls, value: list) -> list:
        for resolution in value:
            problem = resolution_problem(resolution)
            if problem:
                raise ValueError(problem)
        if len(set(value)) != len(value):
            raise ValueError(f"resolutions must be unique, got {value}")
        return sorted(value)

    @model_validator(mode="after")
    def _ranges(self) -> "BuildSection":
        conditions = self.conditions
        for name, (low, high) in (("conditions.blur_sigma", conditions.blur_sigma),
                                  ("conditions.inpaint_fraction", conditions.inpaint_fraction)):
            if not 0 < low <= high:
                raise ValueError(f"{name}: expected 0 < low <= high, got ({low}, {high})")
        if conditions.inpaint_fraction[1] > 1:
            raise ValueError("conditions.inpaint_fraction: the high end must be <= 1")
        for name, (low, high) in (("conditions.canny_low", conditions.canny_low),
                                  ("conditions.canny_high", conditions.canny_high)):
            if not 0 <= low <= high:
                raise ValueError(f"{name}: expected 0 <= low <= high, got ({low}, {high})")
        if conditions.canny_low[1] > conditions.canny_high[0]:
            raise ValueError(f"conditions.canny_low {list(conditions.canny_low)} must end at or below where "
                             f"conditions.canny_high {list(conditions.canny_high)} starts (low <= high on every draw)")
        kernel = conditions.blur_kernel
        if kernel is not None and not (1 <= kernel[0] <= kernel[1] and kernel[0] % 2 == kernel[1] % 2 == 1):
            raise ValueError(f"conditions.blur_kernel: expected odd sizes 1 <= low <= high (e.g. [7, 21]), got "
                             f"{list(kernel)}; or null for 6 sigma + 1")
        identities = [s.name for s in self.sources if getattr(s, "layout", None) == "identities"]
        if identities and not self.faces.enabled:
            raise ValueError(f"sources {identities} lay out identities, whose groups keep only pictures with a face: "
                             "enable build.faces (faces: {enabled: true})")
        spec = self.encode.image_tokenizer
        problem = tokenizer_factor_problem(spec, image_tokenizer_factor(spec))
        if problem:
            raise ValueError(f"encode.image_tokenizer: {problem}")
        return self


class BuildConfig(OnegenConfig):
    """`onegen build`: sources -> Ray Data stages -> WebDataset + Parquet latent shards with a manifest."""

    build: BuildSection

    @property
    def build_name(self) -> str:
        return self.build.name or self.run.name


SCHEMAS["build"] = BuildConfig
