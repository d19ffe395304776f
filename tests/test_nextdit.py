"""The OneDiffusion denoiser (model/nextdit.py): numerics, conventions, presets, save/load (spec §1, §10)."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.attention import softcap_self_attention, tiled_cross_attention
from model.nextdit import PRESETS, NextDiT
from host_sync import HostSyncRecorder
from reference_nextdit import reference_forward
from model.rope import apply_rope, rope_cos_sin, rope_frequencies, token_positions

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

RELEASE_CONFIG_FIELDS = {
    "hidden_size", "depth", "num_heads", "num_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps",
    "caption_channels", "qk_norm", "patch_size", "in_channels", "rotary_max_length", "rotary_max_length_t",
    "input_size", "pred_sigma", "norm_type", "model_max_length",
}  # fmt: skip
RELEASE_ONLY_METADATA = {
    "decay": 0.9999, "inv_gamma": 1.0, "power": 2 / 3, "min_decay": 0.0, "optimization_step": 8000,
    "use_ema_warmup": False, "update_after_step": 0, "forward_dtype": "bfloat16", "param_dtype": "float32",
    "remat_attention": "", "remat_block": "", "remat_mlp": "",
}  # fmt: skip
TEXT_DIM = 16


def tiny_model(num_heads=4, num_kv_heads=2, depth=2, hidden_size=96, seed=0, randomize=True, **overrides):
    """A tiny NextDiT whose zero-initialised parameters are made random, so every path affects the output."""
    torch.manual_seed(seed)
    config = dict(
        PRESETS["nextdit-tiny"],
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        caption_channels=TEXT_DIM,
    )
    model = NextDiT(**{**config, **overrides}).eval()
    if randomize:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.2 * torch.randn_like(param))
    return model


def inputs(batch=2, views=2, h=5, w=7, text_len=6, seed=1, pad_text=True):
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(batch, views, 16, h, w, generator=g)
    text = torch.randn(batch, text_len, TEXT_DIM, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    if pad_text:
        mask[-1, text_len // 2 :] = 0
    return samples, text, mask


def timesteps_of_kind(kind, batch, views, h, w, seed=2):
    g = torch.Generator().manual_seed(seed)
    per_view = torch.rand(batch, views, generator=g) * 1000
    if kind == "per_sample":
        return per_view[:, 0]
    if kind == "per_view":
        return per_view
    if kind == "per_view_elementwise":
        return per_view[:, :, None, None, None].expand(batch, views, 16, h, w).contiguous()
    if kind == "per_element":
        return torch.rand(batch, views, 16, h, w, generator=g) * 1000
    raise ValueError(kind)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def official_state_dict_file() -> Path:
    """The release's parameter names and shapes (a copy of shared/docs/official_state_dict_2.8b.txt, kept in the
    repository so the check runs from any clone)."""
    return Path(__file__).resolve().parent / "data" / "official_state_dict_2.8b.txt"


def official_names_and_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    entries = {}
    for line in official_state_dict_file().read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split("\t")
            entries[name] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    expanded = {}
    for name, shape in entries.items():
        if name.startswith("layers.0."):
            for i in range(depth):
                expanded[name.replace("layers.0.", f"layers.{i}.", 1)] = shape
        else:
            expanded[name] = shape
    return expanded


# ---------------------------------------------------------------------------------------------- fast path = reference


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=lambda k: f"kv{k}")
@pytest.mark.parametrize("views", [1, 2, 3, 4])
def test_fast_paths_match_float64_reference_across_gqa_and_views(num_kv_heads, views):
    model = tiny_model(num_kv_heads=num_kv_heads)
    samples, text, mask = inputs(views=views, h=5, w=7)  # odd latent size, padded text
    for kind in ("per_sample", "per_view_elementwise"):
        t = timesteps_of_kind(kind, 2, views, 5, 7)
        ref = reference_forward(model, samples, t, text, mask)
        for impl in ("math", "flex"):
            model.attn_impl = impl
            with torch.no_grad():
                out = model(samples, t, text, mask)
            assert out.shape == (2, views, 16, 5, 7) and out.dtype == torch.float32
            assert rel_err(out, ref) <= 1e-4, (kind, impl)


@pytest.mark.parametrize("kind", ["per_sample", "per_view", "per_view_elementwise", "per_element"])
@pytest.mark.parametrize("h, w", [(4, 6), (5, 7), (1, 3)])
def test_timestep_forms_and_latent_sizes_match_reference(kind, h, w):
    model = tiny_model()
    samples, text, mask = inputs(views=3, h=h, w=w)
    t = timesteps_of_kind(kind, 2, 3, h, w)
    with torch.no_grad():
        out = model(samples, t, text, mask)
    assert out.shape == (2, 3, 16, h, w)
    assert rel_err(out, reference_forward(model, samples, t, text, mask)) <= 1e-4


def test_adaln_is_computed_once_per_view_unless_time_varies_inside_a_view():
    model = tiny_model()
    samples, text, mask = inputs(views=3, h=4, w=6)  # 2 x 3 = 6 tokens per view
    seen = []
    model.layers[0].adaLN_modulation.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        per_view = model(samples, timesteps_of_kind("per_view_elementwise", 2, 3, 4, 6), text, mask)
        per_view_again = model(samples, timesteps_of_kind("per_view", 2, 3, 4, 6), text, mask)
        model(samples, timesteps_of_kind("per_element", 2, 3, 4, 6), text, mask)
    assert seen == [3, 3, 18]  # views, views, tokens
    assert torch.equal(per_view, per_view_again)


def test_four_dim_input_is_one_view_and_returns_five_dims():
    model = tiny_model()
    samples, text, mask = inputs(views=1, h=4, w=4)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        out4 = model(samples[:, 0], t, text, mask)
        out5 = model(samples, t, text, mask)
    assert out4.shape == (2, 1, 16, 4, 4)
    assert torch.equal(out4, out5)


def test_text_without_valid_tokens_gives_finite_output_equal_to_reference():
    model = tiny_model()
    samples, text, mask = inputs(views=2, h=4, w=4)
    mask[0] = 0  # sample 0 has no valid text token
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():
        out = model(samples, t, text, mask)
        bool_mask_out = model(samples, t, text, mask.bool())
    assert torch.isfinite(out).all()
    assert torch.equal(out, bool_mask_out)
    assert rel_err(out, reference_forward(model, samples, t, text, mask)) <= 1e-4


def test_padded_text_tokens_do_not_influence_the_output():
    model = tiny_model()
    samples, text, mask = inputs(views=2, h=4, w=4)
    changed = text.clone()
    changed[mask == 0] = 100.0
    t = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(model(samples, t, text, mask), model(samples, t, changed, mask))


# ---------------------------------------------------------------------------------------------- softcap


def test_softcap_is_active_in_both_paths_when_logits_are_large():
    model = tiny_model()
    with torch.no_grad():  # QK-norm normalises away a scaled wq/wk, so scale the norms' gains: logits x 64
        for block in model.layers:
            block.attention.q_norm.weight.mul_(8.0)
            block.attention.k_norm.weight.mul_(8.0)
    samples, text, mask = inputs(views=2, h=4, w=6)
    t = torch.tensor([100.0, 800.0])
    capped_ref = reference_forward(model, samples, t, text, mask, softcap=30.0)
    uncapped_ref = reference_forward(model, samples, t, text, mask, softcap=None)
    assert rel_err(uncapped_ref.float(), capped_ref) > 0.05  # the cap changes this model's output clearly
    for impl in ("math", "flex"):
        model.attn_impl = impl
        with torch.no_grad():
            out = model(samples, t, text, mask)
            model.attn_softcap = None
            out_uncapped = model(samples, t, text, mask)
            model.attn_softcap = 30.0
        assert rel_err(out, capped_ref) <= 1e-4, impl
        assert rel_err(out_uncapped, uncapped_ref) <= 1e-4, impl


def test_softcap_is_applied_in_bfloat16_too():
    model = tiny_model()
    with torch.no_grad():
        for block in model.layers:
            block.attention.q_norm.weight.mul_(8.0)
            block.attention.k_norm.weight.mul_(8.0)
    samples, text, mask = inputs(views=2, h=4, w=6)
    t = torch.tensor([100.0, 800.0])
    capped_ref = reference_forward(model, samples, t, text, mask, softcap=30.0)
    uncapped_ref = reference_forward(model, samples, t, text, mask, softcap=None)
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(samples.bfloat16(), t, text.bfloat16(), mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, capped_ref) < 0.5 * rel_err(out, uncapped_ref)


def test_bfloat16_autocast_stays_close_to_float32():
    model = tiny_model()
    samples, text, mask = inputs(views=2, h=4, w=6)
    t = torch.tensor([100.0, 800.0])
    with torch.no_grad():
        expected = model(samples, t, text, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(samples, t, text, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, expected.double()) < 5e-2


def test_softcap_math_path_caps_logits_at_30():
    q = torch.randn(1, 2, 5, 6) * 20
    k = torch.randn(1, 1, 5, 6) * 20
    v = torch.randn(1, 1, 5, 6)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    logits = q @ kr.transpose(-1, -2) / math.sqrt(6)
    assert logits.abs().max() > 60
    expected = (30 * torch.tanh(logits / 30)).softmax(-1) @ vr
    torch.testing.assert_close(softcap_self_attention(q, k, v, attn_impl="math"), expected)
    with torch.no_grad():
        torch.testing.assert_close(softcap_self_attention(q, k, v, attn_impl="flex"), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- head conventions


def loop_attention_reference(attn, x, text, text_mask, self_kv_head, text_kv_head):
    """One SelfCrossAttention module written as per-head loops, with the KV head of each query head given."""
    B, N, _ = x.shape
    H, Hkv, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_norm(attn.wq(x)).view(B, N, H, Dh)
    k = attn.k_norm(attn.wk(x)).view(B, N, Hkv, Dh)
    v = attn.wv(x).view(B, N, Hkv, Dh)
    ky = attn.ky_norm(attn.wk_y(text)).view(B, -1, Hkv, Dh)
    vy = attn.wv_y(text).view(B, -1, Hkv, Dh)
    heads = []
    for i in range(H):
        s = q[:, :, i] @ k[:, :, self_kv_head(i)].transpose(1, 2) / math.sqrt(Dh)
        out = (30 * torch.tanh(s / 30)).softmax(-1) @ v[:, :, self_kv_head(i)]
        sy = q[:, :, i] @ ky[:, :, text_kv_head(i)].transpose(1, 2) / math.sqrt(Dh)
        sy = sy.masked_fill(~text_mask[:, None, :], float("-inf"))
        out_y = sy.softmax(-1) @ vy[:, :, text_kv_head(i)]
        heads.append(out + torch.tanh(attn.gate[i]) * out_y)
    return attn.wo(torch.cat(heads, dim=-1))


def test_self_attention_interleaves_kv_heads_and_text_attention_tiles_them():
    model = tiny_model(num_heads=4, num_kv_heads=2)
    attn = model.layers[0].attention
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 96, generator=g)
    text = torch.randn(2, 5, TEXT_DIM, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    no_rotation = torch.ones(10, 12), torch.zeros(10, 12)  # isolate the head conventions from RoPE
    interleave, tile = (lambda i: i // 2), (lambda i: i % 2)
    with torch.no_grad():
        out = attn(x, *no_rotation, text, text_mask, 30.0, "math")
        right = loop_attention_reference(attn, x, text, text_mask, interleave, tile)
        swapped_self = loop_attention_reference(attn, x, text, text_mask, tile, tile)
        swapped_text = loop_attention_reference(attn, x, text, text_mask, interleave, interleave)
    torch.testing.assert_close(out, right, rtol=1e-5, atol=1e-5)
    assert rel_err(swapped_self, right.double()) > 1e-2
    assert rel_err(swapped_text, right.double()) > 1e-2


def test_cross_attention_head_i_reads_text_head_i_mod_kv_heads():
    q = torch.randn(1, 4, 3, 6)
    k = torch.randn(1, 2, 5, 6)
    v = torch.randn(1, 2, 5, 6)
    out = tiled_cross_attention(q, k, v, torch.ones(1, 5, dtype=torch.bool))
    for i in range(4):
        expected = torch.softmax(q[:, i] @ k[:, i % 2].transpose(-1, -2) / math.sqrt(6), -1) @ v[:, i % 2]
        torch.testing.assert_close(out[:, i], expected)


# ---------------------------------------------------------------------------------------------- RoPE


def test_rope_rotates_view_row_and_column_pairs_by_their_positions():
    # head_dim 6: three complex pairs, one per axis, each with frequency theta**0 = 1.
    positions = torch.tensor([[0, 0, 0], [1, 2, 3], [5, 0, 7]])
    cos, sin = rope_cos_sin(positions, head_dim=6)
    x = torch.arange(1.0, 7.0).expand(1, 3, 1, 6).contiguous()  # pairs (1, 2), (3, 4), (5, 6)
    out = apply_rope(x, cos, sin)[0, :, 0]
    for n, (view, row, col) in enumerate(positions.tolist()):
        for pair, angle in enumerate((view, row, col)):
            a, b = x[0, n, 0, 2 * pair], x[0, n, 0, 2 * pair + 1]
            cos_a, sin_a = math.cos(angle), math.sin(angle)
            expected = torch.stack([a * cos_a - b * sin_a, a * sin_a + b * cos_a])
            torch.testing.assert_close(out[n, 2 * pair : 2 * pair + 2], expected)


def test_rope_uses_theta_10000_and_20_frequencies_per_axis_for_the_release_head():
    freqs = rope_frequencies(120)
    assert freqs.shape == (20,)
    torch.testing.assert_close(freqs, 10000.0 ** (-torch.arange(20, dtype=torch.float64) / 20))
    assert token_positions(2, 2, 3)[7].tolist() == [1, 0, 1]  # view-major, then row, then column


def test_rope_extrapolation_switch_follows_the_release():
    from model.nextdit import _rope_scaling

    assert _rope_scaling(torch.tensor([500.0]), 1.0, 1.0) == (10000.0, 1.0)  # off
    assert _rope_scaling(torch.tensor([500.0]), 2.0, 1.0) == (20000.0, 1.0)  # NTK: theta * s
    assert _rope_scaling(torch.tensor([0.5]), 2.0, 1.0) == (10000.0, 2.0)  # interpolation: omega / s


def test_rope_range_is_checked():
    model = tiny_model(rotary_max_length=4)
    samples, text, mask = inputs(views=1, h=10, w=4)  # 5 patch rows > 4
    with pytest.raises(ValueError, match="rotary_max_length"):
        model(samples, torch.tensor([1.0, 2.0]), text, mask)


# ---------------------------------------------------------------------------------------------- presets and names


def test_release_preset_has_the_official_parameter_count_names_and_shapes():
    expected = official_names_and_shapes(depth=16)
    with torch.device("meta"):
        model = NextDiT.from_preset("onediffusion-2.8b")
    assert sum(p.numel() for p in model.parameters()) == 2_800_389_184
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == expected
    official = {name: torch.empty(shape, device="meta") for name, shape in expected.items()}
    model.load_state_dict(official, strict=True, assign=True)


def test_any_config_uses_the_official_parameter_names():
    model = NextDiT.from_preset("nextdit-tiny", num_kv_heads=1, depth=3)
    assert set(model.state_dict()) == set(official_names_and_shapes(depth=3))
    cond_width = min(96, 1024)
    assert model.t_embedder.mlp[2].weight.shape == (cond_width, cond_width)
    assert model.layers[0].adaLN_modulation[1].weight.shape == (4 * 96, cond_width)


def test_small_presets_build_and_run():
    for name in ("nextdit-tiny", "nextdit-small"):
        model = NextDiT.from_preset(name)
        text_dim = PRESETS[name]["caption_channels"]
        with torch.no_grad():
            out = model(torch.randn(1, 2, 16, 8, 8), torch.tensor([500.0]), torch.randn(1, 4, text_dim))
        assert out.shape == (1, 2, 16, 8, 8)
    with pytest.raises(ValueError, match="unknown NextDiT preset"):
        NextDiT.from_preset("nextdit-huge")


def test_invalid_configs_and_inputs_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="divisible by 6"):
        NextDiT.from_preset("nextdit-tiny", hidden_size=64, num_heads=4)
    model = tiny_model()
    samples, text, mask = inputs()
    with pytest.raises(ValueError, match="in_channels=16"):
        model(samples[:, :, :4], torch.tensor([1.0, 2.0]), text, mask)
    with pytest.raises(ValueError, match="caption_channels"):
        model(samples, torch.tensor([1.0, 2.0]), text[..., :4], mask)
    with pytest.raises(ValueError, match="timesteps"):
        model(samples, torch.ones(2, 3, 4), text, mask)


# ---------------------------------------------------------------------------------------------- init and gradients


def test_initialisation_follows_lumina_and_every_parameter_gets_a_gradient():
    model = NextDiT.from_preset("nextdit-tiny", caption_channels=TEXT_DIM)
    assert not model.final_layer.linear.weight.any() and not model.layers[0].adaLN_modulation[1].weight.any()
    assert not model.layers[0].attention.gate.any()
    samples, text, mask = inputs(views=2, h=4, w=4)
    t = torch.tensor([200.0, 900.0])
    with torch.no_grad():
        assert not model(samples, t, text, mask).any()  # each block starts as the identity, the head predicts 0
    model.train()
    target = torch.randn_like(samples)
    (model(samples, t, text, mask) - target).square().mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0  # the head learns first, then gates open
    randomized = tiny_model()
    randomized.train()
    assert randomized.attn_impl == "auto"  # math on CPU: FlexAttention has no CPU backward
    loss = randomized(samples, t, text, mask).square().mean()
    loss.backward()
    for name, param in randomized.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    samples, text, mask = inputs(views=2, h=4, w=4)
    t = torch.tensor([200.0, 900.0])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(samples, t, text, mask).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


# ---------------------------------------------------------------------------------------------- save / load


def assert_same_parameters(a: NextDiT, b: NextDiT):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def test_save_pretrained_then_from_pretrained_is_bit_exact(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size=50_000)
    assert (tmp_path / "single" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    samples, text, mask = inputs()
    t = torch.tensor([10.0, 990.0])
    with torch.no_grad():
        expected = model(samples, t, text, mask)
    for folder in ("single", "sharded"):
        loaded = NextDiT.from_pretrained(tmp_path / folder).eval()
        assert_same_parameters(model, loaded)
        assert all(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded(samples, t, text, mask), expected)


def test_config_json_uses_the_release_field_names(tmp_path):
    model = NextDiT.from_preset("nextdit-tiny")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "NextDiT"
    assert RELEASE_CONFIG_FIELDS <= set(config)
    assert {k: config[k] for k in ("hidden_size", "depth", "num_heads", "num_kv_heads", "patch_size")} == {
        "hidden_size": 96, "depth": 2, "num_heads": 4, "num_kv_heads": 2, "patch_size": [1, 2, 2],
    }  # fmt: skip
    assert "attn_impl" not in config


def test_release_config_with_ema_and_jax_fields_loads_without_warnings(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(RELEASE_ONLY_METADATA, _class_name="NextDiT", _diffusers_version="0.31.0", input_size=[1, 96, 96])
    config["pred_sigma"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = NextDiT.from_pretrained(tmp_path)
        NextDiT(**{k: v for k, v in config.items() if not k.startswith("_")})  # the constructor accepts them too
    assert_same_parameters(model, loaded)
    with pytest.warns(UserWarning, match="hiden_size"):
        NextDiT.from_preset("nextdit-tiny", hiden_size=3)


def test_bfloat16_weights_load_in_the_requested_dtype(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / "diffusion_pytorch_model.safetensors")["x_embedder.weight"].dtype == torch.bfloat16
    as_bf16 = NextDiT.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert_same_parameters(model, as_bf16)
    as_fp32 = NextDiT.from_pretrained(tmp_path)
    assert as_fp32.dtype == torch.float32
    assert torch.equal(as_fp32.x_embedder.weight, model.x_embedder.weight.float())


def test_weights_with_a_missing_or_extra_key_are_refused_by_name(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ok")
    state = load_file(tmp_path / "ok" / "diffusion_pytorch_model.safetensors")

    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "ok", missing)
    save_file({k: v for k, v in state.items() if k != "layers.1.attention.wk_y.weight"},
              missing / "diffusion_pytorch_model.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match=r"missing keys \['layers\.1\.attention\.wk_y\.weight'\]") as error:
        NextDiT.from_pretrained(missing)
    assert str(missing) in str(error.value)

    extra = tmp_path / "extra"
    shutil.copytree(tmp_path / "ok", extra)
    save_file({**state, "layers.0.attention.conv.weight": torch.zeros(2)},
              extra / "diffusion_pytorch_model.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match="unexpected keys.*conv.weight"):
        NextDiT.from_pretrained(extra)


def test_from_pretrained_reads_a_subfolder_and_refuses_pickles(tmp_path):
    tiny_model().save_pretrained(tmp_path / "release" / "transformer")
    assert isinstance(NextDiT.from_pretrained(tmp_path / "release", subfolder="transformer"), NextDiT)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tmp_path / "release" / "transformer" / "config.json", pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        NextDiT.from_pretrained(pickled)


# ---------------------------------------------------------------------------------------------- official semantics
#
# An independent float64 transcription of the release's forward pass (lehduong/OneDiffusion @ 6a64303,
# modeling_nextdit.py + layers.py), written for these tests in plain torch. It follows the release's structure and
# reads nothing from model/ except the parameter values (by their official names): its own token/feature index
# maps, its own precomputed complex RoPE table sliced [:views, :rows, :cols] as the release does, repeat-interleave
# for self-attention KV heads and einops "(repeat h)" tiling for the text KV heads, key-padding by masked_fill.
# Two things are not the release's verbatim: the self-attention logits are soft-capped (the release's flash path,
# which the weights were trained with; its fp32 SDPA fallback forgets the cap) and everything is float64.


def official_semantics_forward(
    params: dict[str, torch.Tensor],
    config: dict,
    samples: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor,
    scale_factor: float = 1.0,
    scale_watershed: float = 1.0,
    softcap: float | None = 30.0,
) -> torch.Tensor:
    f64 = torch.float64
    p = {name: value.detach().to(f64) for name, value in params.items()}
    pT, pH, pW = config["patch_size"]
    dim, heads = config["hidden_size"], config["num_heads"]
    kv_heads = config["num_kv_heads"] or heads
    head_dim, rep = dim // heads, heads // kv_heads
    eps, qk_norm = config["norm_eps"], config["qk_norm"]
    table_len, table_len_t = config["rotary_max_length"], config["rotary_max_length_t"]

    def linear(name, v):
        out = v @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    def layer_norm(v, eps_, name=None):  # nn.LayerNorm over the last dim, affine when `name` is given
        mu = v.mean(-1, keepdim=True)
        var = (v - mu).pow(2).mean(-1, keepdim=True)
        out = (v - mu) / torch.sqrt(var + eps_)
        return out * p[f"{name}.weight"] + p[f"{name}.bias"] if name else out

    def rms_norm(v, name):  # layers.RMSNorm: normalise, (cast back: a no-op in float64), then times the weight
        return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)) * p[f"{name}.weight"]

    # --- token <-> latent index maps: token n = (g * rows + r) * cols + c, feature f = ((a * pH + i) * pW + j) * C + ch
    def index_maps(T, C, Hh, Ww):
        G, rows, cols = T // pT, Hh // pH, Ww // pW
        g, r, c, a, i, j, ch = torch.meshgrid(
            *(torch.arange(n) for n in (G, rows, cols, pT, pH, pW, C)), indexing="ij"
        )
        token = (g * rows + r) * cols + c
        feature = ((a * pH + i) * pW + j) * C + ch
        return (token, feature), (g * pT + a, ch, r * pH + i, c * pW + j), (G, rows, cols)

    def to_tokens(v):  # (B, T, C, H, W) -> (B, N, pT*pH*pW*C)
        B, T, C, Hh, Ww = v.shape
        (token, feature), (t_i, c_i, h_i, w_i), (G, rows, cols) = index_maps(T, C, Hh, Ww)
        out = torch.zeros(B, G * rows * cols, pT * pH * pW * C, dtype=f64)
        out[:, token, feature] = v.to(f64)[:, t_i, c_i, h_i, w_i]
        return out, (G, rows, cols)

    def from_tokens(tokens, T, C, Hh, Ww):  # inverse of to_tokens
        (token, feature), (t_i, c_i, h_i, w_i), _ = index_maps(T, C, Hh, Ww)
        out = torch.zeros(tokens.shape[0], T, C, Hh, Ww, dtype=f64)
        out[:, t_i, c_i, h_i, w_i] = tokens[:, token, feature]
        return out

    # --- precompute_freqs_cis: a (views, len, len, head_dim/2) complex table; chunks [view | row | column]
    def rope_table(max_timestep):
        linear_factor, ntk_factor = (scale_factor, 1.0) if max_timestep < scale_watershed else (1.0, scale_factor)
        theta = 10000.0 * ntk_factor
        omega = 1.0 / theta ** (torch.arange(0, head_dim, 6, dtype=f64)[: head_dim // 6] / head_dim) / linear_factor
        def unit_complex(length):  # exp(1j * position * omega), positions 0 .. length-1
            angles = torch.outer(torch.arange(length, dtype=f64), omega)
            return torch.polar(torch.ones_like(angles), angles)

        axis = unit_complex(table_len)
        n_t = table_len_t or table_len
        axis_t = unit_complex(n_t)
        shape = (n_t, table_len, table_len, head_dim // 6)
        return torch.cat(
            [axis_t[:, None, None].expand(shape), axis[None, :, None].expand(shape), axis[None, None, :].expand(shape)],
            dim=-1,
        )

    x5 = samples[:, None] if samples.ndim == 4 else samples
    B, T, C, Hh, Ww = x5.shape
    t = timesteps.to(f64)
    if t.ndim == 1:
        t = t[:, None, None, None, None].expand(x5.shape)
    t_tokens = to_tokens(t)[0].mean(-1)  # (B, N): mean over each patch's entries
    tokens, (G, rows, cols) = to_tokens(x5)
    table = rope_table(float(timesteps.max()))  # the release rebuilds it only when scaling is on; same values
    cis = table[:G, :rows, :cols].reshape(G * rows * cols, head_dim // 2)

    x = linear("x_embedder", tokens)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=f64) / half)
    args = t_tokens[:, :, None] * freqs
    t_emb = linear("t_embedder.mlp.2", F.silu(linear("t_embedder.mlp.0", torch.cat([args.cos(), args.sin()], -1))))
    text = encoder_hidden_states.to(f64)
    m = encoder_attention_mask[..., None].to(f64)
    pooled = (text * m).sum(1) / (m.sum(1) + 1e-8)
    y_emb = linear("y_embedder.1", layer_norm(pooled, 1e-6, "y_embedder.0"))
    adaln = t_emb + y_emb[:, None]  # (B, N, cond)

    def rotate(v):  # view interleaved pairs as complex numbers, multiply by the table row of each token
        z = torch.view_as_complex(v.reshape(*v.shape[:-1], head_dim // 2, 2).contiguous())
        return torch.view_as_real(z * cis[None, :, None, :]).flatten(-2)

    def attention(pre, h, y):
        N, L = h.shape[1], y.shape[1]
        xq, xk, xv = linear(f"{pre}.wq", h), linear(f"{pre}.wk", h), linear(f"{pre}.wv", h)
        if qk_norm:
            xq, xk = layer_norm(xq, 1e-5, f"{pre}.q_norm"), layer_norm(xk, 1e-5, f"{pre}.k_norm")
        xq = xq.view(B, N, heads, head_dim)
        xk = xk.view(B, N, kv_heads, head_dim).repeat_interleave(rep, dim=2)
        xv = xv.view(B, N, kv_heads, head_dim).repeat_interleave(rep, dim=2)
        xq, xk = rotate(xq), rotate(xk)
        logits = torch.einsum("bnhd,bmhd->bhnm", xq, xk) / math.sqrt(head_dim)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        out = torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), xv)

        yk = linear(f"{pre}.wk_y", y)
        if qk_norm:
            yk = layer_norm(yk, 1e-6, f"{pre}.ky_norm")
        yk = yk.view(B, L, kv_heads, head_dim).repeat(1, 1, rep, 1)  # einops "b l h d -> b l (repeat h) d"
        yv = linear(f"{pre}.wv_y", y).view(B, L, kv_heads, head_dim).repeat(1, 1, rep, 1)
        logits_y = torch.einsum("bnhd,blhd->bhnl", xq, yk) / math.sqrt(head_dim)
        logits_y = logits_y.masked_fill(encoder_attention_mask[:, None, None, :] == 0, float("-inf"))
        out_y = torch.einsum("bhnl,blhd->bnhd", logits_y.softmax(-1), yv)
        out = out + out_y * torch.tanh(p[f"{pre}.gate"]).view(1, 1, -1, 1)
        return linear(f"{pre}.wo", out.flatten(-2))

    for i in range(config["depth"]):
        pre = f"layers.{i}"
        scale_msa, gate_msa, scale_mlp, gate_mlp = linear(f"{pre}.adaLN_modulation.1", F.silu(adaln)).chunk(4, -1)
        h = rms_norm(x, f"{pre}.attention_norm1") * (1 + scale_msa)
        attn_out = attention(f"{pre}.attention", h, rms_norm(text, f"{pre}.attention_y_norm"))
        x = x + torch.tanh(gate_msa) * rms_norm(attn_out, f"{pre}.attention_norm2")
        h = rms_norm(x, f"{pre}.ffn_norm1") * (1 + scale_mlp)
        swiglu = F.silu(linear(f"{pre}.feed_forward.w1", h)) * linear(f"{pre}.feed_forward.w3", h)
        ffn_out = linear(f"{pre}.feed_forward.w2", swiglu)
        x = x + torch.tanh(gate_mlp) * rms_norm(ffn_out, f"{pre}.ffn_norm2")

    scale = linear("final_layer.adaLN_modulation.1", F.silu(adaln))
    x = linear("final_layer.linear", layer_norm(x, 1e-6) * (1 + scale))
    out_channels = 2 * C if config["pred_sigma"] else C
    return from_tokens(x, T, out_channels, Hh, Ww)


def official_semantics_model(rotary_max_length_t=None):
    """GQA (4 query heads on 2 KV heads), short RoPE table, and q/k-norm gains that make the softcap matter."""
    model = tiny_model(num_heads=4, num_kv_heads=2, rotary_max_length=8, rotary_max_length_t=rotary_max_length_t)
    with torch.no_grad():
        for block in model.layers:
            block.attention.q_norm.weight.mul_(8.0)
            block.attention.k_norm.weight.mul_(8.0)
    return model


def pipeline_style_timesteps(kind, batch, views, h, w):
    """(B,) as in pipeline.__call__; per element as in img2img (view 1 a clean condition at a small t)."""
    if kind == "per_sample":
        return torch.tensor([700.0, 350.0])[:batch]
    if kind == "img2img":
        t = torch.full((batch, views, 16, h, w), 620.0)
        t[:, 1] = 20.0
        return t
    return timesteps_of_kind("per_element", batch, views, h, w)


@pytest.mark.parametrize(
    "scale_factor, scale_watershed", [(1.0, 1.0), (2.0, 1.0), (1.5, 2000.0)], ids=["no_scaling", "ntk", "linear"]
)
@pytest.mark.parametrize("kind", ["per_sample", "img2img", "per_element"])
def test_forward_matches_an_independent_transcription_of_the_official_module(kind, scale_factor, scale_watershed):
    model = official_semantics_model(rotary_max_length_t=4 if kind == "per_element" else None)
    samples, text, mask = inputs(batch=2, views=2, h=4, w=6)  # 2 views of 2 x 3 patches; sample 1 half padding
    t = pipeline_style_timesteps(kind, 2, 2, 4, 6)
    config = dict(model.config)
    params = model.state_dict()
    official = official_semantics_forward(params, config, samples, t, text, mask, scale_factor, scale_watershed)
    scaling = dict(rope_scale_factor=scale_factor, rope_scale_watershed=scale_watershed)
    with torch.no_grad():
        as_float64 = model.double()
        for impl in ("math", "flex"):
            as_float64.attn_impl = impl
            out = as_float64(samples.double(), t.double(), text.double(), mask, **scaling)
            assert out.shape == official.shape == (2, 2, 16, 4, 6)
            assert rel_err(out, official) <= 1e-10, impl
        model.float().attn_impl = "math"
        # the release's own keyword names (scale_factor / scale_watershed) are accepted as aliases
        released_names = dict(scale_factor=scale_factor, scale_watershed=scale_watershed)
        assert rel_err(model(samples, t, text, mask, **released_names), official) <= 1e-4
    if kind == "per_sample" and scale_factor == 1.0:  # the cap and the scaling are both exercised by this model
        uncapped = official_semantics_forward(model.state_dict(), config, samples, t, text, mask, softcap=None)
        assert rel_err(uncapped.float(), official) > 0.05
        ntk = official_semantics_forward(model.state_dict(), config, samples, t, text, mask, 2.0, 1.0)
        assert rel_err(ntk.float(), official) > 1e-3


def test_official_transcription_catches_swapped_conventions(monkeypatch):
    """The comparison is sensitive to the conventions it checks: text KV heads interleaved instead of tiled, or the
    RoPE chunks ordered (column, row, view), give a clearly different output."""
    import model.nextdit as nextdit_module

    model = official_semantics_model()
    samples, text, mask = inputs(batch=2, views=2, h=4, w=6)
    t = torch.tensor([700.0, 350.0])
    official = official_semantics_forward(model.state_dict(), dict(model.config), samples, t, text, mask)
    with torch.no_grad():
        assert rel_err(model(samples, t, text, mask), official) <= 1e-4
    tiled = nextdit_module.tiled_cross_attention

    def interleaved_cross_attention(q, k, v, key_mask):
        group = q.shape[1] // k.shape[1]
        return tiled(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), key_mask)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(nextdit_module, "tiled_cross_attention", interleaved_cross_attention)
        assert rel_err(model(samples, t, text, mask), official) > 1e-2
    positions = nextdit_module.token_positions
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(nextdit_module, "token_positions", lambda *a, **k: positions(*a, **k).flip(-1))
        assert rel_err(model(samples, t, text, mask), official) > 1e-2


# ---------------------------------------------------------------------------------------------- bf16 details


def test_rmsnorm_casts_back_before_the_weight_multiply_as_the_release():
    """layers.RMSNorm: _norm(x.float()).type_as(x) * weight, i.e. in a bf16 model two roundings, bit for bit."""
    from model.nextdit import RMSNorm

    g = torch.Generator().manual_seed(4)
    norm = RMSNorm(96)
    with torch.no_grad():
        norm.weight.copy_(1 + 2 * torch.randn(96, generator=g))
    norm = norm.bfloat16()
    x = torch.randn(64, 96, generator=g).bfloat16()
    x32 = x.float()
    release = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * norm.weight
    with torch.no_grad():
        assert torch.equal(norm(x), release)
        # fp32 weights with bf16 activations promote to fp32 in the release (bf16 normalised values x fp32 weight)
        norm = norm.float()
        promoted = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * norm.weight
        assert promoted.dtype == torch.float32 and torch.equal(norm(x), promoted)


@pytest.mark.parametrize("impl", ["math", "flex"])
def test_bf16_self_attention_keeps_float32_logits_like_flash_attention(impl):
    """flash_attn_varlen_func(softcap=30) forms the logits of bf16 q, k in fp32 and caps them in fp32; rounding q or
    the logits to bf16 first costs several times the bf16 output rounding."""
    g = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(1, 4, 64, 24, generator=g)).bfloat16()
    k = (3 * torch.randn(1, 2, 64, 24, generator=g)).bfloat16()
    v = torch.randn(1, 2, 64, 24, generator=g).bfloat16()
    logits = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(24)
    assert logits.abs().max() > 30  # the cap is active
    expected = (30 * torch.tanh(logits / 30)).softmax(-1) @ v.double().repeat_interleave(2, 1)
    output_rounding = rel_err(expected.bfloat16(), expected)
    with torch.no_grad():
        out = softcap_self_attention(q, k, v, attn_impl=impl)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) <= 1.5 * output_rounding


def test_float32_rope_table_is_the_release_table():
    """precompute_freqs_cis: float32 omegas (computed on the CPU) times float32 positions, exp(1j * angle) in
    complex64, chunks [view | row | column]; the 128 x 128 x 128 table is sliced [:views, :rows, :cols]."""
    head_dim, length = 120, 128
    positions = token_positions(3, 128, 5)  # rows up to 127, the largest angles of the release table
    for theta, linear_factor in ((10000.0, 1.0), (20000.0, 1.0), (10000.0, 2.0)):
        omega = 1.0 / (theta ** (torch.arange(0, head_dim, 6)[: head_dim // 6] / head_dim)) / linear_factor
        axis = torch.exp(1j * torch.outer(torch.arange(length, dtype=torch.float32), omega).float())  # complex64
        release = torch.cat([axis[positions[:, 0]], axis[positions[:, 1]], axis[positions[:, 2]]], dim=-1)
        cos, sin = rope_cos_sin(positions, head_dim, torch.float32, theta, linear_factor)
        ulp = 2.0**-23
        assert (cos - release.real).abs().max() <= ulp and (sin - release.imag).abs().max() <= ulp


# ---------------------------------------------------------------------------------------------- release config / folder

RELEASE_CONFIG_JSON = {  # transformer/config.json of lehduong/OneDiffusion, reconstructed from spec §1.1
    "_class_name": "NextDiT", "_diffusers_version": "0.30.3",
    "caption_channels": 2048, "depth": 16, "ffn_dim_multiplier": None, "hidden_size": 3840, "in_channels": 16,
    "input_size": [1, 96, 96], "model_max_length": 512, "multiple_of": 256, "norm_eps": 1e-05, "norm_type": "rms",
    "num_heads": 32, "num_kv_heads": 8, "patch_size": [1, 2, 2], "pred_sigma": False, "qk_norm": True,
    "rotary_max_length": 128, "rotary_max_length_t": None, **RELEASE_ONLY_METADATA,
}  # fmt: skip


def test_release_config_json_builds_the_release_module():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.device("meta"):
            model = NextDiT(**{k: v for k, v in RELEASE_CONFIG_JSON.items() if not k.startswith("_")})
            preset = NextDiT.from_preset("onediffusion-2.8b")
    assert {k: v for k, v in model.config.items() if not k.startswith("_")} == {
        k: v for k, v in preset.config.items() if not k.startswith("_")
    }
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == official_names_and_shapes(depth=16)
    assert model.layers[0].feed_forward.w1.out_features == 10240  # 256 * ceil(int(2 * 4 * 3840 / 3) / 256)
    assert model.layers[0].attention.ky_norm.eps == 1e-6 and model.layers[0].attention.q_norm.eps == 1e-5
    assert model.final_layer.norm_final.eps == 1e-6 and model.final_layer.norm_final.weight is None
    assert model.y_embedder[0].eps == 1e-6 and model.y_embedder[0].weight is not None
    assert model.out_channels == 16 and model.patch_size == (1, 2, 2)


def test_release_style_folder_with_sharded_bf16_weights_loads_strictly(tmp_path):
    """A folder laid out like the release: config.json with the EMA/JAX fields, bf16 safetensors in two shards and
    a diffusers index.json (names as the hub writes them)."""
    model = tiny_model().to(torch.bfloat16)
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    names = sorted(state)
    shards = {
        "diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
        "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    folder = tmp_path / "transformer"
    folder.mkdir()
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / file)
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in state.values())},
             "weight_map": {k: file for file, keys in shards.items() for k in keys}}  # fmt: skip
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    config = {**RELEASE_CONFIG_JSON, **{k: v for k, v in model.config.items() if not k.startswith("_")}}
    (folder / "config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_bf16 = NextDiT.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=torch.bfloat16)
        as_fp32 = NextDiT.from_pretrained(folder)
    assert_same_parameters(model, as_bf16)
    assert as_fp32.dtype == torch.float32
    assert all(torch.equal(as_fp32.state_dict()[k], state[k].float()) for k in state)


def test_math_attention_keeps_float32_logits_under_autocast():
    """bf16 training runs under autocast: the soft-capped logits must still be computed in fp32 (as flash-attn does),
    so the math path gives bit-identical results with and without an enclosing autocast region."""
    from model.attention import softcap_self_attention

    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 4, 24, 24, generator=g) * 3).bfloat16()
    k = (torch.randn(1, 2, 24, 24, generator=g) * 3).bfloat16()
    v = torch.randn(1, 2, 24, 24, generator=g).bfloat16()
    plain = softcap_self_attention(q, k, v, attn_impl="math")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = softcap_self_attention(q, k, v, attn_impl="math")
    assert autocast.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(autocast, plain)


# ------------------------------------------------------------------------------------- timesteps as the release

def release_patch_mean(timesteps: torch.Tensor, samples_shape, patch=(1, 2, 2)) -> torch.Tensor:
    """The release's timestep path, transcribed: (B,) times are `expand_as(samples)` (a broadcast view), 5-D times
    are used as given, then `patchify(...)` (view, permute, reshape) and a float32 `mean(-1)` per token."""
    if timesteps.ndim == 1:
        timesteps = timesteps[:, None, None, None, None].expand(samples_shape)
    B, T, C, H, W = timesteps.size()
    pT, pH, pW = patch
    x = timesteps.view(B, T // pT, pT, C, H // pH, pH, W // pW, pW).permute(0, 1, 4, 6, 2, 5, 7, 3)
    return x.reshape(B, -1, pT * pH * pW * C).mean(dim=-1)


def test_timestep_patch_mean_is_the_release_float32_value_not_the_exact_one():
    """The release's float32 patch mean of 64 equal values is often not that value, and differs between the
    broadcast (text-to-image) and dense (img2img) layouts: NextDiT reproduces both, (B, T) taking the dense form."""
    model = tiny_model()
    seen = []
    model.t_embedder.register_forward_hook(lambda module, args, out: seen.append(args[0].clone()))
    batch, views, h, w = 3, 2, 4, 6
    samples, text, mask = inputs(batch=batch, views=views, h=h, w=w)
    t = torch.tensor([[377.1234, 912.77], [41.0101, 600.0], [987.6543, 123.4567]])
    tokens = (h // 2) * (w // 2)
    with torch.no_grad():
        model(samples, t[:, 0], text, mask)  # (B,)
        model(samples, t, text, mask)  # (B, T)
        model(samples, t[:, :, None, None, None].expand(samples.shape).clone(), text, mask)  # dense per element
    broadcast = release_patch_mean(t[:, 0], samples.shape).view(batch, views, tokens)
    dense = release_patch_mean(t[:, :, None, None, None].expand(samples.shape).clone(), samples.shape)
    dense = dense.view(batch, views, tokens)
    assert torch.equal(seen[0], broadcast[..., 0]) and torch.equal(seen[1], dense[..., 0])
    assert torch.equal(seen[2], seen[1])
    # the rounding is real: for these values the release's means are not the values themselves
    assert not torch.equal(dense[..., 0], t) and not torch.equal(broadcast[..., 0], t[:, :1].expand(-1, views))


def test_a_training_forward_and_backward_with_per_view_timesteps_never_syncs_with_the_host():
    model = tiny_model().train()
    samples, text, mask = inputs()
    timesteps = torch.rand(2, 2) * 1000
    with HostSyncRecorder() as recorder:
        model(samples, timesteps, text, mask).square().mean().backward()
    assert recorder.syncs == []
    with HostSyncRecorder() as recorder:  # it does see a sync: per-element timesteps are checked on the host
        model(samples, timesteps_of_kind("per_element", 2, 2, 5, 7), text, mask)
    assert recorder.syncs
