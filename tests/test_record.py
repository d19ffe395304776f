"""pipelines.record.Sample: the one record form of every source; lossless WebDataset round trip, clear errors."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from pipelines.record import (
    Sample, SampleError, read_sample_files, samples_from_wds_tar, samples_to_wds_tar, write_sample_files,
)
from pipelines.sources.synthetic import synthetic_samples


@pytest.fixture(scope="module")
def synthetic():
    return next(synthetic_samples(seed=3, num_scenes=1, views_per_scene=1, size=48))


def web_image(**overrides):
    rng = np.random.default_rng(0)
    fields = dict(key="laion-000123", source="laion", image=rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
                  captions={"original": "a dog on a beach"})
    fields.update(overrides)
    return Sample(**fields)


def test_synthetic_sample_round_trips_exactly(synthetic):
    synthetic.validate()
    wds = synthetic.to_wds()
    assert set(wds) == {"__key__", "png", "depth.npy", "instance.png", "semantic.png", "json"}
    back = Sample.from_wds(wds)
    assert back.differences(synthetic) == []
    assert back.depth.dtype == np.float32 and back.instance.dtype == np.int32
    assert back.camera["K"].dtype == np.float64 and back.keypoints.shape == synthetic.keypoints.shape
    assert back.to_wds() == wds
    assert back.content_digest() == synthetic.content_digest()


def test_plain_web_image_with_caption_is_a_valid_sample():
    s = web_image().validate()
    wds = s.to_wds()
    assert set(wds) == {"__key__", "png", "json"}
    assert Sample.from_wds(wds).differences(s) == []


def test_large_ids_fall_back_to_npy_and_jpg_is_accepted():
    smooth = np.broadcast_to(np.linspace(0, 250, 30, dtype=np.uint8)[None, :, None], (20, 30, 3)).copy()
    s = web_image(image=smooth, instance=np.full((20, 30), 70000, dtype=np.int32))
    wds = s.to_wds(image_format="jpg")
    assert "instance.npy" in wds and "jpg" in wds and "png" not in wds
    back = Sample.from_wds(wds)
    assert back.differences(s) == ["image"]  # JPEG is lossy; everything else is exact
    assert np.abs(back.image.astype(int) - s.image).mean() < 3


def test_a_changed_field_is_reported_by_name(synthetic):
    other = Sample.from_wds(synthetic.to_wds())
    other.depth = other.depth + np.float32(1e-3)
    other.captions = {**other.captions, "short": "something else"}
    assert other.differences(synthetic) == ["captions", "depth"]
    assert other.content_digest() != synthetic.content_digest()


@pytest.mark.parametrize("overrides, field", [
    ({"key": "has.dot"}, "key"),
    ({"image": np.zeros((20, 30), np.uint8)}, "image"),
    ({"image": np.zeros((20, 30, 3), np.float32)}, "image"),
    ({"captions": {"short": 3}}, "captions"),
    ({"depth": np.zeros((20, 30), np.float64), "depth_kind": "z"}, "depth"),
    ({"depth": np.zeros((10, 30), np.float32), "depth_kind": "z"}, "depth"),
    ({"depth": np.zeros((20, 30), np.float32)}, "depth_kind"),
    ({"instance": np.zeros((20, 30), np.int64)}, "instance"),
    ({"semantic": np.zeros((20, 30), np.int32)}, "classes"),
    ({"semantic": np.full((20, 30), 2, np.int32), "classes": ["sky", "ground"]}, "semantic"),
    ({"keypoints": np.zeros((1, 18, 3), np.float32)}, "keypoints"),
    ({"keypoints": np.full((1, 17, 3), 3, np.float32)}, "keypoints"),
    ({"entities": [{"class": "cube"}]}, "entities"),
    ({"camera": {"K": np.eye(3), "c2w_opengl": np.eye(4), "w2c_opencv": np.eye(4), "width": 30, "height": 99}},
     "camera"),
    ({"camera": {"K": np.eye(3), "width": 30, "height": 20}}, "camera"),
    ({"meta": {"x": object()}}, "meta"),
])
def test_validate_errors_name_the_field(overrides, field):
    with pytest.raises(SampleError) as err:
        web_image(**overrides).validate()
    assert err.value.field == field
    assert f"field {field!r}" in str(err.value) and "laion-000123" in str(err.value) or field == "key"


def test_from_wds_rejects_decoded_or_incomplete_samples(synthetic):
    wds = synthetic.to_wds()
    with pytest.raises(SampleError, match="'json'"):
        Sample.from_wds({k: v for k, v in wds.items() if k != "json"})
    with pytest.raises(SampleError, match="raw bytes"):
        Sample.from_wds({**wds, "png": np.zeros((2, 2, 3), np.uint8)})


def test_folder_files_round_trip(tmp_path, synthetic):
    paths = write_sample_files(synthetic, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{synthetic.key}.{ext}" for ext in synthetic.to_wds()
                                                   if ext != "__key__")
    assert read_sample_files(tmp_path, synthetic.key).differences(synthetic) == []
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # (Storage's temporaries neither)
    assert read_sample_files(f"file://{tmp_path}", synthetic.key).differences(synthetic) == []
    with pytest.raises(FileNotFoundError, match="no-such-key"):
        read_sample_files(tmp_path, "no-such-key")


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_wds_tar_bytes_round_trip_in_order():
    samples = [web_image(key=f"laion-{i:06d}", captions={"original": f"caption {i}"}) for i in range(3)]
    data = samples_to_wds_tar(samples)
    assert data == samples_to_wds_tar(samples)  # mtime 0: same samples, same bytes
    back = samples_from_wds_tar(data)
    assert [b.key for b in back] == [s.key for s in samples]
    assert all(b.differences(s) == [] for b, s in zip(back, samples))
    # members of a key need not be adjacent; groups keep the order of each key's first member
    wds = [s.to_wds() for s in samples[:2]]
    mixed = [(f"{w['__key__']}.{ext}", w[ext]) for ext in ("json", "png") for w in wds]
    assert [b.key for b in samples_from_wds_tar(_tar(mixed))] == [s.key for s in samples[:2]]


def test_wds_tar_reader_rejects_malformed_members():
    wds = web_image().to_wds()
    with pytest.raises(ValueError, match="appears twice"):
        samples_from_wds_tar(_tar([("laion-000123.json", wds["json"]), ("laion-000123.json", wds["json"])]))
    with pytest.raises(ValueError, match="KEY.EXT"):
        samples_from_wds_tar(_tar([("README", b"x")]))
    with pytest.raises(SampleError, match="'png'"):
        samples_from_wds_tar(_tar([("laion-000123.json", wds["json"])]))
