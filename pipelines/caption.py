"""The caption labeler (build.caption): a transformers image-text-to-text model describes every sample.

The release's captions are LLaVA-NeXT's (ONEDIFFUSION_SPEC §6; the default is the demo's
llava-hf/llama3-llava-next-8b-hf with its instruction); any model transformers loads with
AutoModelForImageTextToText and whose processor has a chat template works. Each actor loads the model once and
captions a batch in one greedy `generate` call (left-padded prompts: the new tokens line up at the end). The picture
captioned is the one training sees: the first view's crop at the build's largest resolution (a multiview scene gets
one caption, as the release's DL3DV scenes did). The caption goes beside the source's own captions, named
build.caption.name with origin `generated`; the trainer draws among them.

Outcomes counted per sample: ok; truncated (the token budget ended it; the caption is kept); empty (no text: no
caption); error (the model failed on it: no caption, the message in the shard's stats).
"""

from __future__ import annotations

from typing import Any

from onegen.build_config import CaptionSection
from pipelines.labelers import OK, LabelerStage, resolve_model, torch_dtype

EMPTY, TRUNCATED = "empty", "truncated"


def preflight(section: CaptionSection) -> dict[str, Any]:
    """Resolve the model, read its config and processor (small files; the weights are only listed): what the actors
    need is the hub commit, so each node loads the very same weights."""
    from pathlib import Path

    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    folder, revision = resolve_model(section)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"{folder} holds a {config.model_type!r} model, not an image-text-to-text one "
                         "(AutoModelForImageTextToText cannot load it); pick a vision-language chat model such as "
                         "LLaVA-NeXT")
    if not any(Path(folder).glob("*.safetensors")) and not any(Path(folder).glob("*.bin")):
        raise FileNotFoundError(f"{folder} has a config but no weights (*.safetensors); download the whole folder")
    processor = AutoProcessor.from_pretrained(folder)
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{folder}: its processor has no chat template, so the instruction cannot be put to it; "
                         "pick an instruction-tuned (chat) model")
    return {"revision": revision}


class Stage(LabelerStage):
    stage = "caption"

    def setup(self, resolved: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        section = self.section
        folder, _ = resolve_model(section.model_copy(update={"revision": resolved.get("revision")}))
        self.device = "cuda" if section.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.dtype = torch_dtype(section, self.device)
        self.processor = AutoProcessor.from_pretrained(folder)
        self.processor.tokenizer.padding_side = "left"  # batched generation: every prompt ends where new text starts
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=self.dtype).to(self.device).eval()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": section.instruction}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def label(self, records: list[dict]) -> list[tuple[str, str | None]]:
        import torch
        from PIL import Image

        images = [Image.fromarray(record["outputs"][-1]["samples"][0].image) for record in records]
        inputs = self.processor(images=images, text=[self.prompt] * len(images), padding=True, return_tensors="pt")
        inputs = inputs.to(self.device).to(self.dtype)  # .to(dtype) casts the floating inputs (pixels) only
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.section.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:].cpu()
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        results = []
        for record, tokens, text in zip(records, new.tolist(), texts, strict=True):
            text = text.strip()
            if not text:
                results.append((EMPTY, "the model wrote no text"))
                continue
            record.setdefault("generated_captions", {})[self.section.name] = text
            results.append((OK if self.eos & set(tokens) else TRUNCATED, None))
        return results
