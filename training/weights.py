"""Where a run's weights come from, checked on the driver before a worker starts: the transformer (the preset's seeded
initialisation, or `model.init`, a release-layout folder or hub id: full fine-tuning, or with `model.lora` the frozen
base of a LoRA adapter) and the frozen T5.

    sources = check_model_sources(cfg)       # driver: one-line ConfigError on a misfit; pins hub ids to a commit
    model = load_transformer(cfg, sources)   # every rank: the same weights (and the same fresh adapter)
    base = base_identity(cfg, sources)       # a LoRA run's base.json: URI, pinned commit/version, sha256

Only configs are read on the driver (a hub id downloads `transformer/config.json` and `text_encoder/config.json`, not
the weights): a misfit fails in seconds, and the workers load the very commit the driver checked, each node into its
own Hugging Face cache, even if the hub repo moves while the run goes on. (One exception: a LoRA run with checkpoints
on a local base folder hashes the base's weights on the driver, training.launch, since a folder can change.)
"""

from __future__ import annotations

import json
from pathlib import Path

from onegen.config import ConfigError
from onegen.errors import first_line
from onegen.train_config import TINY_T5, TrainConfig

TRANSFORMER_FILES = ["model_index.json", "transformer/*"]
TEXT_ENCODER_FILES = ["text_encoder/*", "tokenizer/*"]


def pinned_folder(spec: str, revision: str | None, patterns: list[str], tracking_uri: str | None = None) -> Path:
    """The local folder of a path, a hub id (at `revision`: the commit the driver resolved, or None for the one
    `main` names now) or a registered model models:/NAME@ALIAS or models:/NAME/VERSION (at `revision`: the version
    the driver resolved the alias to; its pipeline/ read from the registry of `tracking_uri`); downloaded once per
    node, then read from the cache."""
    from onegen.registry import is_model_uri, parse_model_uri, resolve_version, version_pipeline

    if is_model_uri(spec):
        name, _, _ = parse_model_uri(spec)
        return version_pipeline(tracking_uri, name, revision or resolve_version(tracking_uri, spec))
    from model.hub import resolve_pretrained_folder

    return resolve_pretrained_folder(spec, allow_patterns=patterns, revision=revision)


def _subfolder(root: Path, name: str) -> Path:
    """The release layout's `name/` when it exists, else the folder itself (a bare NextDiT or T5 folder)."""
    return root / name if (root / name).is_dir() else root


def _config(key: str, spec: str, patterns: list[str], name: str, revision: str | None = None,
            tracking_uri: str | None = None) -> tuple[dict, str | None, Path]:
    """(config.json of `name/` in the folder, hub repo or registered model `spec`, the commit a hub id resolved to or
    the version a registered model's alias names, the folder)."""
    from mlflow.exceptions import MlflowException

    from onegen.registry import is_model_uri, resolve_version

    try:
        if is_model_uri(spec) and revision is None:
            revision = resolve_version(tracking_uri, spec)
        folder = pinned_folder(spec, revision, patterns, tracking_uri)
        path = _subfolder(folder, name) / "config.json"
        config = json.loads(path.read_text())
    except (OSError, ValueError, MlflowException) as err:
        raise ConfigError([f"{key}={spec!r}: cannot read its {name} config ({first_line(err)}); give a "
                           f"release-layout folder ({name}/config.json + weights), a {name} folder, a hub id, or "
                           "a registered model models:/NAME@ALIAS"]) from None
    if not is_model_uri(spec):
        revision = None if Path(spec).exists() else folder.name  # the cache's snapshots/<commit>
    return config, revision, folder


def transformer_config_problem(config: dict, preset: str) -> str | None:
    """How a NextDiT config.json differs from the preset's architecture (None: it fits). Fields the preset does not
    name (the release's EMA bookkeeping and the like) are ignored."""
    from model.presets import PRESETS

    expected = PRESETS[preset]
    differ = [f"{key} {_plain(config.get(key, 'missing'))} (preset {_plain(value)})"
              for key, value in expected.items() if _plain(config.get(key, "missing")) != _plain(value)]
    return ", ".join(differ) if differ else None


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def check_model_sources(cfg: TrainConfig, image_tokenizer: str | None = None) -> dict:
    """Check `model.init` against the preset (and, given the builds' `image_tokenizer` id, against the kind of
    latents it was made for) and the text encoder's width against the preset's caption width, from their configs
    alone. Returns {"init": commit or None, "text_encoder": commit or None} (None: a local folder, the tiny T5, or no
    init): what the workers load. Raises ConfigError, one line naming the key and the fix."""
    from model.presets import PRESETS
    from onegen.tracking import tracking_uri

    model = cfg.model
    preset = PRESETS[model.preset]
    sources: dict = {"init": None, "text_encoder": None}
    if model.init is not None:
        config, sources["init"], folder = _config("model.init", model.init,
                                                  ["model_index.json", "transformer/config.json"], "transformer",
                                                  tracking_uri=tracking_uri(cfg))
        problem = transformer_config_problem(config, model.preset)
        if problem:
            raise ConfigError([f"model.init={model.init!r}: its transformer does not fit model.preset={model.preset} "
                               f"({problem}); pick the preset of those weights"])
        problem = image_tokenizer and init_tokenizer_problem(folder, image_tokenizer)
        if problem:
            raise ConfigError([f"model.init={model.init!r}: {problem}"])
    spec = model.text_encoder_source
    if spec != TINY_T5:
        key = "model.text_encoder" if model.text_encoder else "model.init (its text encoder)"
        same = spec == model.init  # the init's own T5: the commit the init resolved to, not a second lookup
        config, sources["text_encoder"], _ = _config(key, spec, ["text_encoder/config.json"], "text_encoder",
                                                     revision=sources["init"] if same else None,
                                                     tracking_uri=tracking_uri(cfg))
        width = config.get("d_model")
        if width is None:
            raise ConfigError([f"{key}={spec!r}: no T5 encoder config there (no text_encoder/config.json with "
                               "d_model); set model.text_encoder to a release-layout folder, a T5 folder or a hub id"])
        if width != preset["caption_channels"]:
            raise ConfigError([f"{key}={spec!r}: T5 width (d_model) {width}, but model.preset={model.preset} reads "
                               f"captions of width {preset['caption_channels']}; pair the preset with the text "
                               "encoder it was made for"])
    return sources


def init_tokenizer_problem(folder: Path, image_tokenizer: str) -> str | None:
    """Why weights made for one kind of latents cannot train on the builds' (pixel vs VAE), from the folder's
    model_index.json; None when they fit or the folder does not say (a bare transformer folder)."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        return None
    entry = json.loads(index_path.read_text()).get("vae") or [None, None]
    made_for_pixels = entry[-1] == "PixelTokenizer"
    if made_for_pixels != (image_tokenizer == "pixel"):
        return (f"its weights were made for {entry[-1]} latents, but the builds hold {image_tokenizer!r} latents; "
                "build the data with the same image tokenizer (build.encode.image_tokenizer) or train without --init")
    return None


def resumed_sources(state: dict, sources: dict) -> dict:
    """The commits a resumed run loads: those its checkpoint recorded (the hub repo may have moved since), so the
    losses after the resume are the ones the run would have had."""
    recorded = {key: (state.get(key) or {}).get("revision") for key in ("init", "text_encoder")}
    return {key: recorded[key] or value for key, value in sources.items()}


def load_transformer(cfg: TrainConfig, sources: dict, previous: str | None = None, start_from: str = "ema"):
    """A stage's starting NextDiT, the same on every rank: with `previous`, the previous stage's final EMA weights
    (previous = its pipeline/ folder) or, start_from="model", its trained weights (previous = its checkpoint folder,
    consolidated from ds/); else `model.init`'s weights (float32), or the preset's initialisation seeded by
    run.seed. With model.lora: model.init's weights, frozen, with a LoRA adapter (peft), fresh or, with `previous`,
    the previous stage's (previous = its adapter/ folder)."""
    import torch

    from model.nextdit import NextDiT

    if cfg.model.lora is not None:
        model = add_lora(NextDiT.from_pretrained(init_transformer_folder(cfg, sources),
                                                 attn_impl=cfg.model.attn_impl), cfg)
        if previous is not None:
            load_adapter_weights(model, previous)
        return model
    if previous is not None:
        from training.loop import DS_TAG, PIPELINE_DIR

        pipeline = Path(previous) / PIPELINE_DIR if start_from == "model" else Path(previous)
        model = NextDiT.from_pretrained(pipeline / "transformer", attn_impl=cfg.model.attn_impl)
        if start_from == "model":
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            trained = get_fp32_state_dict_from_zero_checkpoint(str(previous), tag=DS_TAG)
            model.load_state_dict({name: value.float() for name, value in trained.items()}, strict=True)
        return model
    if cfg.model.init is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            return NextDiT.from_preset(cfg.model.preset, attn_impl=cfg.model.attn_impl)
    return NextDiT.from_pretrained(init_transformer_folder(cfg, sources), attn_impl=cfg.model.attn_impl)


def init_transformer_folder(cfg: TrainConfig, sources: dict) -> Path:
    """The local NextDiT folder of model.init (its transformer/, or the folder itself), at the pinned commit."""
    from onegen.tracking import tracking_uri

    return _subfolder(pinned_folder(cfg.model.init, sources.get("init"), TRANSFORMER_FILES, tracking_uri(cfg)),
                      "transformer")


def add_lora(model, cfg: TrainConfig):
    """Freeze every base weight and add model.lora's adapter (peft; lora_B starts at zero, so the adapted model
    starts as the base). lora_A's random start is seeded by run.seed: every rank, and a rerun, the same."""
    import torch

    from model.lora import lora_config

    lora = cfg.model.lora
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model.add_adapter(lora_config(lora.rank, lora.alpha, lora.dropout, lora.target_modules))
    return model


def load_adapter_weights(model, folder: str | Path) -> None:
    """Set the model's adapter to the one saved in `folder` (pytorch_lora_weights.safetensors, diffusers' keys): the
    previous stage's, trained with the same model.lora (part of the content hash); other target modules raise a
    ValueError naming the keys."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from model.lora import ADAPTER_NAME, LORA_WEIGHTS_NAME

    path = Path(folder) / LORA_WEIGHTS_NAME
    state = {name.removeprefix("transformer."): value for name, value in load_file(path).items()}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    missing = sorted(name for name in result.missing_keys if "lora_" in name)
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: the adapter does not fit model.lora (missing {missing[:4]}, unexpected "
                         f"{sorted(result.unexpected_keys)[:4]}); continue with the model.lora it was trained with")


def base_identity(cfg: TrainConfig, sources: dict) -> dict:
    """What a LoRA run's base.json records of its base model: model.init's URI, the commit or registered version it
    was pinned to, and the sha256 of its transformer weights (the weight files' bytes in name order: for one file,
    what `sha256sum` prints), so an adapter is never applied to, or resumed on, other weights unnoticed."""
    from model.nextdit import weight_files, weights_sha256

    folder = init_transformer_folder(cfg, sources)
    return {"uri": cfg.model.init, "revision": sources.get("init"), "sha256": weights_sha256(folder),
            "files": [path.name for path in weight_files(folder)], "preset": cfg.model.preset}


def text_encoder_folder(cfg: TrainConfig, sources: dict) -> Path:
    """The local folder of a configured (non-tiny) T5, at the commit the driver checked."""
    from onegen.tracking import tracking_uri

    return pinned_folder(cfg.model.text_encoder_source, sources.get("text_encoder"), TEXT_ENCODER_FILES,
                         tracking_uri(cfg))


__all__ = ["add_lora", "base_identity", "check_model_sources", "init_tokenizer_problem", "init_transformer_folder",
           "load_adapter_weights", "load_transformer", "pinned_folder", "resumed_sources", "text_encoder_folder",
           "transformer_config_problem"]
