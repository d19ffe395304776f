"""Where a run's weights come from, checked on the driver before a worker starts: the transformer (the preset's seeded
initialisation, or `model.init`, a release-layout folder or hub id: full fine-tuning) and the frozen T5.

    sources = check_model_sources(cfg)       # driver: one-line ConfigError on a misfit; pins hub ids to a commit
    model = load_transformer(cfg, sources)   # every rank: the same weights

Only configs are read on the driver (a hub id downloads `transformer/config.json` and `text_encoder/config.json`, not
the weights): a misfit fails in seconds, and the workers load the very commit the driver checked, each node into its
own Hugging Face cache, even if the hub repo moves while the run goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

from onegen.config import ConfigError
from onegen.train_config import TINY_T5, TrainConfig

TRANSFORMER_FILES = ["model_index.json", "transformer/*"]
TEXT_ENCODER_FILES = ["text_encoder/*", "tokenizer/*"]


def pinned_folder(spec: str, revision: str | None, patterns: list[str]) -> Path:
    """The local folder of a path or a hub id (at `revision`, the commit the driver resolved; downloaded once per
    node, then read from the cache)."""
    from model.hub import resolve_pretrained_folder

    return resolve_pretrained_folder(spec, allow_patterns=patterns, revision=revision)


def _subfolder(root: Path, name: str) -> Path:
    """The release layout's `name/` when it exists, else the folder itself (a bare NextDiT or T5 folder)."""
    return root / name if (root / name).is_dir() else root


def _config(key: str, spec: str, patterns: list[str], name: str) -> tuple[dict, str | None]:
    """(config.json of `name/` in the folder or hub repo `spec`, the commit a hub id resolved to)."""
    from model.hub import resolve_pretrained_folder

    try:
        folder = resolve_pretrained_folder(spec, allow_patterns=patterns)
        path = _subfolder(folder, name) / "config.json"
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError([f"{key}={spec!r}: cannot read its {name} config ({reason}); give a release-layout folder "
                           f"({name}/config.json + weights), a {name} folder, or a hub id"]) from None
    revision = None if Path(spec).exists() else folder.name  # the cache's snapshots/<commit>
    return config, revision


def transformer_config_problem(config: dict, preset: str) -> str | None:
    """How a NextDiT config.json differs from the preset's architecture (None: it fits). Fields the preset does not
    name (the release's EMA bookkeeping and the like) are ignored."""
    from model.presets import PRESETS

    expected = PRESETS[preset]
    differ = [f"{key} {_plain(config.get(key))} (preset {_plain(value)})" for key, value in expected.items()
              if _plain(config.get(key, value)) != _plain(value)]
    return f"{', '.join(differ)}" if differ else None


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def check_model_sources(cfg: TrainConfig) -> dict:
    """Check `model.init` against the preset and the text encoder's width against the preset's caption width, from
    their configs alone. Returns {"init": commit or None, "text_encoder": commit or None} (None: a local folder, the
    tiny T5, or no init): what the workers load. Raises ConfigError, one line naming the key and the fix."""
    from model.presets import PRESETS

    model = cfg.model
    preset = PRESETS[model.preset]
    sources: dict = {"init": None, "text_encoder": None}
    if model.init is not None:
        config, sources["init"] = _config("model.init", model.init, ["model_index.json", "transformer/config.json"],
                                          "transformer")
        problem = transformer_config_problem(config, model.preset)
        if problem:
            raise ConfigError([f"model.init={model.init!r}: its transformer does not fit model.preset={model.preset} "
                               f"({problem}); pick the preset of those weights"])
    spec = model.text_encoder_source
    if spec != TINY_T5:
        key = "model.text_encoder" if model.text_encoder else "model.init (its text encoder)"
        config, sources["text_encoder"] = _config(key, spec, ["text_encoder/config.json"], "text_encoder")
        width = config.get("d_model")
        if width != preset["caption_channels"]:
            raise ConfigError([f"{key}={spec!r}: T5 width (d_model) {width}, but model.preset={model.preset} reads "
                               f"captions of width {preset['caption_channels']}; pair the preset with the text "
                               "encoder it was made for"])
    return sources


def load_transformer(cfg: TrainConfig, sources: dict):
    """The run's starting NextDiT, the same on every rank: `model.init`'s weights (float32), or the preset's
    initialisation seeded by run.seed."""
    import torch

    from model.nextdit import NextDiT

    if cfg.model.init is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            return NextDiT.from_preset(cfg.model.preset, attn_impl=cfg.model.attn_impl)
    folder = pinned_folder(cfg.model.init, sources.get("init"), TRANSFORMER_FILES)
    return NextDiT.from_pretrained(_subfolder(folder, "transformer"), attn_impl=cfg.model.attn_impl)


def text_encoder_folder(cfg: TrainConfig, sources: dict) -> Path:
    """The local folder of a configured (non-tiny) T5, at the commit the driver checked."""
    return pinned_folder(cfg.model.text_encoder_source, sources.get("text_encoder"), TEXT_ENCODER_FILES)


__all__ = ["check_model_sources", "load_transformer", "pinned_folder", "text_encoder_folder",
           "transformer_config_problem"]
