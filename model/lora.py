"""LoRA adapters of the NextDiT (peft through diffusers' PeftAdapterMixin) and their files in diffusers' convention.

    transformer.add_adapter(lora_config(rank=16, alpha=16))        # base frozen by the caller, adapter trainable
    save_adapter(transformer, folder)                              # folder/pytorch_lora_weights.safetensors + config
    transformer.load_lora_adapter(folder, prefix="transformer")     # diffusers' loader reads it back

The file is what diffusers' single-transformer pipelines write (`save_lora_weights`): peft's parameter names
(`layers.0.attention.wq.lora_A.weight`, adapter name dropped) prefixed `transformer.`, the LoraConfig as the
safetensors metadata `lora_adapter_metadata`; peft's own `adapter_config.json` beside it. So diffusers, peft and other
tools read onegen's adapters, and onegen reads theirs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.loaders.lora_pipeline import Lumina2LoraLoaderMixin

from model.presets import LORA_ATTENTION_TARGETS as ATTENTION_TARGETS
from model.presets import LORA_TARGETS

ADAPTER_NAME = "default"  # peft's name of the one adapter a training run adds
ADAPTER_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = LORA_WEIGHT_NAME_SAFE  # "pytorch_lora_weights.safetensors"


class OneDiffusionLoraLoaderMixin(Lumina2LoraLoaderMixin):
    """diffusers' LoRA file handling for a pipeline whose one adaptable component is `transformer` (Lumina 2's, the
    family OneDiffusion's Next-DiT comes from): the key prefix, the metadata, save_lora_weights."""


def lora_config(rank: int, alpha: float, dropout: float = 0.0, target_modules=ATTENTION_TARGETS):
    """peft's LoraConfig for the NextDiT: `target_modules` are module names of LORA_TARGETS (every block's)."""
    from peft import LoraConfig

    unknown = sorted(set(target_modules) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"LoRA target modules {unknown} are not NextDiT Linear layers; choose from "
                         f"{list(LORA_TARGETS)}")
    return LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout),
                      target_modules=sorted(set(target_modules)), init_lora_weights=True)


def adapter_state_dict(transformer: torch.nn.Module, adapter_name: str = ADAPTER_NAME, *,
                       tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (no adapter name, no `transformer.` prefix), detached copies;
    tensors: the adapter's values under the module's parameter names, when they are not the module's own (the
    optimizer's float32 masters of a bf16 module)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, state_dict=tensors, adapter_name=adapter_name)
    return {name: value.detach().clone().contiguous() for name, value in state.items()}


def save_adapter(transformer, folder: str | Path, adapter_name: str = ADAPTER_NAME, *,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `folder`/pytorch_lora_weights.safetensors (diffusers' convention, float32) and adapter_config.json (peft's)
    of the transformer's adapter (tensors: as adapter_state_dict's)."""
    folder = Path(folder)
    # sets (target_modules) as sorted lists: peft and diffusers write them in hash order, so the same adapter
    # would give other bytes in every process
    config = {key: sorted(value) if isinstance(value, set) else value
              for key, value in transformer.peft_config[adapter_name].to_dict().items()}
    tensors = adapter_state_dict(transformer, adapter_name, tensors=tensors)
    OneDiffusionLoraLoaderMixin.save_lora_weights(
        str(folder), transformer_lora_layers={name: value.float() for name, value in tensors.items()},
        transformer_lora_adapter_metadata=config, weight_name=LORA_WEIGHTS_NAME)
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_NAME", "ATTENTION_TARGETS", "LORA_TARGETS", "LORA_WEIGHTS_NAME",
           "OneDiffusionLoraLoaderMixin", "adapter_state_dict", "lora_config", "save_adapter"]
