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
from pipelines.labelers import OK, Label, LabelerStage, checked_model, preflight_result

EMPTY, TRUNCATED = "empty", "truncated"


def preflight(section: CaptionSection) -> dict[str, Any]:
    """Resolve the model to a folder and a hub commit, read its config and processor (small files only: the
    weights are only listed; each actor downloads the files named here at that commit)."""
    from transformers import AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    folder, revision, _, weights = checked_model(section, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                                                 "AutoModelForImageTextToText",
                                                 "a vision-language chat model such as LLaVA-NeXT")
    processor = AutoProcessor.from_pretrained(folder)
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{folder}: its processor has no chat template, so the instruction cannot be put to it; "
                         "pick an instruction-tuned (chat) model")
    return preflight_result(revision, weights)


class Stage(LabelerStage):
    stage = "caption"

    def load(self, folder: str, device: str, dtype) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, device_map=device).eval()
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": self.section.instruction}]}]
        self.prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        self.add_special_tokens = not (bos and self.prompt.startswith(bos))  # a template's own BOS, not a second
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def smoke_test(self) -> None:
        from PIL import Image

        self.generate([Image.new("RGB", (64, 64), (128, 128, 128))], max_new_tokens=2)

    def generate(self, images: list, max_new_tokens: int) -> tuple[list[str], list[list[int]]]:
        """(texts, new token ids) of one greedy generate() call over `images`."""
        import torch

        # One list per prompt: processors of multi-image models read a flat list as one prompt with n images.
        inputs = self.processor(images=[[image] for image in images], text=[self.prompt] * len(images),
                                padding=True, padding_side="left", add_special_tokens=self.add_special_tokens,
                                return_tensors="pt")
        inputs = inputs.to(self.device).to(self.dtype)  # .to(dtype) casts the floating inputs (pixels) only
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:].cpu()
        return self.processor.batch_decode(new, skip_special_tokens=True), new.tolist()

    def label(self, records: list[dict]) -> list[Label]:
        from PIL import Image

        images = [Image.fromarray(record["outputs"][-1]["samples"][0].image) for record in records]
        texts, tokens = self.generate(images, self.section.max_new_tokens)
        labels = []
        for text, ids in zip(texts, tokens, strict=True):
            text = text.strip()
            if not text:
                labels.append(Label(EMPTY, message="the model wrote no text"))
            else:  # no end-of-sequence token among the new ones: the budget ended it
                labels.append(Label(OK if self.eos & set(ids) else TRUNCATED, value=text))
        return labels
