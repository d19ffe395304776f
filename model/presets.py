"""Named NextDiT configurations: the released OneDiffusion denoiser and small ones for CPU work.

Each preset is a dict of `NextDiT` constructor fields (the release's transformer/config.json names). Build one with
`NextDiT.from_preset(name, **overrides)`, e.g. `NextDiT.from_preset("nextdit-tiny", caption_channels=384)` to pair
it with a different text encoder.
"""

from __future__ import annotations

# The NextDiT's Linear layers a LoRA may adapt in every block (model.lora, config model.lora.target_modules): the
# attention projections, the text keys/values, the SwiGLU feed-forward. Plain data, so configs import it.
LORA_ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
LORA_TARGETS = (*LORA_ATTENTION_TARGETS, "wk_y", "wv_y", "w1", "w2", "w3")

PRESETS: dict[str, dict] = {
    # Spec §1.1: the released checkpoint (lehduong/OneDiffusion, transformer/config.json); 2,800,389,184 parameters.
    "onediffusion-2.8b": dict(
        input_size=(1, 96, 96),
        patch_size=(1, 2, 2),
        in_channels=16,
        hidden_size=3840,
        depth=16,
        num_heads=32,
        num_kv_heads=8,
        multiple_of=256,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        pred_sigma=False,
        caption_channels=2048,
        qk_norm=True,
        norm_type="rms",
        model_max_length=512,
        rotary_max_length=128,
        rotary_max_length_t=None,
    ),
    # ~9.0 M parameters: head_dim 48 (8 pairs per RoPE axis), 4 query heads per KV head as in the release.
    "nextdit-small": dict(
        input_size=(1, 32, 32),
        patch_size=(1, 2, 2),
        in_channels=16,
        hidden_size=384,
        depth=4,
        num_heads=8,
        num_kv_heads=2,
        multiple_of=128,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        pred_sigma=False,
        caption_channels=64,
        qk_norm=True,
        norm_type="rms",
        model_max_length=64,
        rotary_max_length=128,
        rotary_max_length_t=None,
    ),
    # ~0.3 M parameters, for unit tests and smoke runs: head_dim 24 (4 pairs per RoPE axis).
    "nextdit-tiny": dict(
        input_size=(1, 16, 16),
        patch_size=(1, 2, 2),
        in_channels=16,
        hidden_size=96,
        depth=2,
        num_heads=4,
        num_kv_heads=2,
        multiple_of=32,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        pred_sigma=False,
        caption_channels=32,
        qk_norm=True,
        norm_type="rms",
        model_max_length=32,
        rotary_max_length=128,
        rotary_max_length_t=None,
    ),
}
