"""Image and text tokenizers: the pixel tokenizer is exact, the VAE tokenizer scales like the release, T5 gives
300 tokens and a mask."""

import json

import pytest
import torch

from model.tokenizers import (
    LATENT_CHANNELS,
    TEXT_MAX_LENGTH,
    PixelTokenizer,
    T5TextEncoder,
    VAETokenizer,
    build_tiny_t5,
    load_image_tokenizer,
)

SCALING_FACTOR = 1.5305
SHIFT_FACTOR = 0.0609


def tiny_autoencoder(latent_channels: int = 16):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=32,
        scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR,
    )


@pytest.fixture(scope="module")
def vae_root(tmp_path_factory):
    """A release-like root with the tiny VAE in vae/."""
    root = tmp_path_factory.mktemp("release")
    tiny_autoencoder().save_pretrained(str(root / "vae"))
    return root


@pytest.fixture(scope="module")
def t5_root(tmp_path_factory):
    return build_tiny_t5(tmp_path_factory.mktemp("t5"))


def random_images(batch=2, height=16, width=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


# ---------------------------------------------------------------- PixelTokenizer


def test_pixel_tokenizer_maps_rgb_to_16_channels_at_half_resolution():
    tokenizer = PixelTokenizer()
    latents = tokenizer.encode(random_images())
    assert tokenizer.latent_channels == LATENT_CHANNELS == 16 and tokenizer.downsample_factor == 2
    assert latents.shape == (2, 16, 8, 12) and latents.dtype == torch.float32


def test_pixel_tokenizer_round_trip_is_bit_exact():
    tokenizer = PixelTokenizer()
    images = random_images(batch=3, height=32, width=16, seed=1)
    # include values whose low mantissa bits would be lost by any non-power-of-two scale
    images[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 1e-7, 0.1 + 2**-20])
    assert torch.equal(tokenizer.decode(tokenizer.encode(images)), images)
    per_channel = PixelTokenizer(scale=(4.0, 2.0, 0.5))
    assert torch.equal(per_channel.decode(per_channel.encode(images)), images)


def test_pixel_tokenizer_layout_is_scaled_space_to_depth_with_a_zero_pad_channel():
    tokenizer = PixelTokenizer(scale=2.0)
    images = random_images(batch=1, height=4, width=4)
    latents = tokenizer.encode(images)
    # channel 4*c + 2*i + j holds input channel c at offset (i, j) of each 2x2 block
    assert torch.equal(latents[0, 4 * 1 + 2 * 1 + 0], 2.0 * images[0, 1, 1::2, 0::2])
    assert tokenizer.pad_latent_channels == (12, 13, 14, 15)
    assert torch.count_nonzero(latents[:, 12:]) == 0
    # the loss mask drops exactly the channels that are zero for every image
    assert tokenizer.loss_channel_mask.tolist() == [True] * 12 + [False] * 4
    assert torch.equal(latents.abs().amax(dim=(0, 2, 3)) > 0, tokenizer.loss_channel_mask)
    # whatever a denoiser writes into the pad channels does not change the image
    noisy = latents.clone()
    noisy[:, 12:] = 123.0
    assert torch.equal(tokenizer.decode(noisy), images)


def test_pixel_tokenizer_scale_gives_roughly_unit_variance_on_image_like_data():
    # smooth image-like data in [-1, 1] with std ~0.5 (natural images: 0.45-0.7 per channel)
    images = (0.5 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear")
    latents = PixelTokenizer().encode(images)[:, :12]
    assert 0.6 < latents.std().item() < 1.4


def test_pixel_tokenizer_rejects_inexact_scales_and_bad_sizes():
    with pytest.raises(ValueError, match="power of two"):
        PixelTokenizer(scale=1 / 0.55)
    with pytest.raises(ValueError, match="multiple of the downsample factor 2"):
        PixelTokenizer().encode(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        PixelTokenizer().encode(torch.zeros(1, 4, 4, 4))


def test_pixel_tokenizer_saves_and_loads_through_load_image_tokenizer(tmp_path):
    PixelTokenizer(scale=(4.0, 2.0, 2.0)).save_pretrained(tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_class_name"] == "PixelTokenizer"
    for spec in (tmp_path, tmp_path / "vae"):
        loaded = load_image_tokenizer(spec)
        assert isinstance(loaded, PixelTokenizer) and loaded.scale == (4.0, 2.0, 2.0)
    assert isinstance(load_image_tokenizer("pixel"), PixelTokenizer)


# ---------------------------------------------------------------- VAETokenizer


def test_vae_tokenizer_loads_by_path_and_encodes_to_16_channels(vae_root):
    tokenizer = VAETokenizer.from_pretrained(vae_root)  # release root, vae/ subfolder
    assert tokenizer.downsample_factor == 2 and tokenizer.latent_channels == 16
    assert tokenizer.scaling_factor == pytest.approx(SCALING_FACTOR)
    latents = tokenizer.encode(random_images(height=16, width=24))
    assert latents.shape == (2, 16, 8, 12) and latents.dtype == torch.float32
    assert isinstance(load_image_tokenizer(vae_root / "vae"), VAETokenizer)  # bare vae/ folder


def test_vae_tokenizer_applies_scaling_factor_but_not_shift_factor(vae_root):
    tokenizer = VAETokenizer.from_pretrained(vae_root, sample=False)
    vae = tokenizer.vae
    images = random_images()
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    latents = tokenizer.encode(images)
    torch.testing.assert_close(latents, mean * SCALING_FACTOR, rtol=0, atol=0)
    assert not torch.allclose(latents, (mean - SHIFT_FACTOR) * SCALING_FACTOR)
    with torch.no_grad():
        expected_images = vae.decode(latents / SCALING_FACTOR).sample
    torch.testing.assert_close(tokenizer.decode(latents), expected_images, rtol=0, atol=0)


def test_vae_tokenizer_sampling_follows_the_generator(vae_root):
    tokenizer = VAETokenizer.from_pretrained(vae_root)
    images = random_images()
    first = tokenizer.encode(images, generator=torch.Generator().manual_seed(7))
    again = tokenizer.encode(images, generator=torch.Generator().manual_seed(7))
    other = tokenizer.encode(images, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, tokenizer.encode(images, sample=False))


def test_vae_tokenizer_rejects_a_vae_without_16_latent_channels(tmp_path):
    tiny_autoencoder(latent_channels=4).save_pretrained(str(tmp_path / "vae"))
    with pytest.raises(ValueError, match="latent_channels=4"):
        load_image_tokenizer(tmp_path)


def test_load_image_tokenizer_names_the_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_image_tokenizer(tmp_path)


# ---------------------------------------------------------------- T5 text encoder


def test_tiny_t5_is_written_in_the_release_layout_and_is_deterministic(t5_root, tmp_path):
    from transformers import AutoTokenizer

    for name in ("text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/spiece.model",
                 "tokenizer/tokenizer_config.json"):
        assert (t5_root / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(str(t5_root / "tokenizer"))
    ids = tokenizer("[[text2image]] a photo of a cat, 42!").input_ids
    assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id
    again = build_tiny_t5(tmp_path)
    for name in ("text_encoder/model.safetensors", "tokenizer/spiece.model", "tokenizer/tokenizer.json"):
        assert (again / name).read_bytes() == (t5_root / name).read_bytes(), name


def test_t5_text_encoder_gives_300_states_and_a_mask_of_real_tokens(t5_root):
    encoder = T5TextEncoder.from_pretrained(t5_root)
    prompts = ["[[text2image]] a cat", "[[depth2image]] a kitchen with a table and two chairs"]
    states, mask = encoder.encode(prompts)
    assert encoder.hidden_size == 32 and encoder.max_length == TEXT_MAX_LENGTH == 300
    assert states.shape == (2, 300, 32) and states.dtype == torch.float32
    assert mask.shape == (2, 300) and mask.dtype == torch.long
    real_tokens = [len(encoder.tokenizer(p).input_ids) for p in prompts]
    assert mask.sum(dim=1).tolist() == real_tokens
    assert torch.equal(mask[0, : real_tokens[0]], torch.ones(real_tokens[0], dtype=torch.long))


def test_t5_text_encoder_truncates_long_prompts_at_300_tokens(t5_root):
    encoder = T5TextEncoder.from_pretrained(t5_root)
    long_prompt = "a cat on a red sofa " * 200
    assert len(encoder.tokenizer(long_prompt).input_ids) > 300
    states, mask = encoder.encode([long_prompt, ""])
    assert states.shape == (2, 300, 32)
    assert mask[0].sum() == 300 and mask[1].sum() == 1  # "" is just </s>


def test_t5_text_encoder_loads_in_a_requested_dtype(t5_root):
    encoder = T5TextEncoder.from_pretrained(t5_root, torch_dtype=torch.bfloat16)
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    states, _ = encoder.encode("[[multiview]]")
    assert states.dtype == torch.float32  # states are handed on in fp32, as in the release
