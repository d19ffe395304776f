"""A tiny random-weight LLaVA-NeXT (image-text-to-text) checkpoint, built fully offline for tests.

``save_tiny_llava_next(folder)`` writes model + processor + generation_config with ``save_pretrained`` so the
folder loads through ``AutoModelForImageTextToText`` / ``AutoProcessor`` like a hub checkpoint (~250 KiB).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]  # ids 0..4
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(len(SPECIALS))

# A fixed word list -> WordLevel vocab, so any generated id decodes to a plain English word.
WORDS = """the a an of and to in on at with for from by is are was were be this that it its photo image picture
shows show showing contains contents describe description words fewer or more than less one two three four five
red green blue yellow black white gray brown orange purple pink bright dark light small large big tiny huge
cat dog bird horse cow sheep fish tree flower grass sky cloud sun moon water river lake sea beach mountain hill road
street car bus bike train boat plane house building city town room table chair bed window door wall floor
man woman child person people group crowd face hand hair eye smile shirt hat bag book cup plate food fruit apple
sitting standing walking running looking holding playing eating near next behind front under above left right
center background foreground top bottom side day night morning evening sunny cloudy snow rain scene view outdoor
indoor field park garden forest wood stone metal glass paper old new many few some several other there here
user assistant what how why where who which can could would should will please 150 ? . , ! : ;""".split()

# Minimal jinja template: list-of-items content ({"type": "image"} -> "<image>", {"type": "text"} -> its text);
# the newline is written as {{ "\\n" }} because transformers renders templates with trim_blocks.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # "Describe" -> "describe" instead of <unk>
    # Whitespace split (words and punctuation runs) + WordPiece decoder = words joined by single spaces.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=512, padding_side="left",
    )


def save_tiny_llava_next(folder: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny random LlavaNextForConditionalGeneration + LlavaNextProcessor and save both into ``folder``."""
    folder = Path(folder)
    tokenizer = _tokenizer()
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
            pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        ),
        image_token_index=IMAGE_ID, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-2,  # "default" drops CLS -> +1 below
        pad_token_id=PAD_ID, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)  # random init is the only randomness -> identical weights for a fixed seed
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Random weights can make EOS (or another special) the argmax and end generation at once. Zeroing their
        # lm_head rows pins their logits at 0, below the max of ~300 random word logits (always > 0 in practice),
        # so greedy decoding emits plain words; EOS stays a valid stop id, it just never wins.
        model.lm_head.weight[:len(SPECIALS)] = 0
    # Saved next to the weights so generate() knows pad/eos and does not warn about a missing pad_token_id.
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(folder)
    # The PIL backend: LlavaNextImageProcessor would warn and fall back to it anyway without torchvision.
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, chat_template=CHAT_TEMPLATE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # CLIP's CLS token
    )
    processor.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # smoke check: python tests/tiny_vlm.py
    import tempfile
    import time

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    with tempfile.TemporaryDirectory() as tmp:
        a, b = save_tiny_llava_next(Path(tmp) / "a"), save_tiny_llava_next(Path(tmp) / "b")
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "seeded weights differ"
        print("files:", sorted(p.name for p in a.iterdir()))
        print("size: %.1f KiB" % (sum(p.stat().st_size for p in a.iterdir()) / 1024))
        t0 = time.perf_counter()
        model = AutoModelForImageTextToText.from_pretrained(a)
        processor = AutoProcessor.from_pretrained(a)
        t1 = time.perf_counter()
        processor.tokenizer.padding_side = "left"
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Describe the contents of the photo in 150 words or fewer."}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(48, 64), (80, 40)]]
        inputs = processor(images=images, text=[prompt, prompt], padding=True, return_tensors="pt")
        runs = []
        for _ in range(2):
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            runs.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        t2 = time.perf_counter()
        print(type(model).__name__, type(processor).__name__, type(processor.image_processor).__name__,
              type(processor.tokenizer).__name__)
        print("prompt:", repr(prompt))
        print("input_ids:", tuple(inputs["input_ids"].shape), "image tokens/row:",
              (inputs["input_ids"] == model.config.image_token_index).sum(1).tolist())
        print("texts:", runs[0])
        print("load %.2fs, load+2x generate %.2fs" % (t1 - t0, t2 - t0))
        assert runs[0] == runs[1] and all(t.strip() for t in runs[0]), runs
