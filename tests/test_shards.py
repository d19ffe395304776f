"""The build's output contract (onegen/shards.py): latent bytes, the versioned schema, splits, duplicates."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from onegen.shards import (LATENT_SCHEMA, SCHEMA_METADATA_KEY, ShardSchemaError, check_shard_schema, decode_array,
                           duplicate_losers, encode_array, latent_entry, parquet_bytes, row_latents, shard_table,
                           split_of)


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("float16", torch.float16),
                                                ("bfloat16", torch.bfloat16)])
def test_latent_bytes_round_trip_as_torch_casts(dtype, torch_dtype):
    values = np.random.default_rng(0).normal(size=(16, 4, 6)).astype(np.float32) * 7
    values[0, 0, :3] = [np.inf, -0.0, 1e-40]  # the edges a hand-written cast gets wrong
    expected = torch.from_numpy(values).to(torch_dtype).float().numpy()
    decoded = decode_array(encode_array(values, dtype), values.shape, dtype)
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    np.testing.assert_array_equal(decoded, expected)


def test_unknown_dtypes_are_refused():
    with pytest.raises(ValueError, match="latent dtype must be one of"):
        encode_array(np.zeros(3), "int8")
    with pytest.raises(ShardSchemaError, match="unknown latent dtype 'int8'"):
        decode_array(b"\0" * 3, (3,), "int8")


def _row(sample_id: str, mean: np.ndarray, std: np.ndarray | None) -> dict:
    return {"id": sample_id, "group_id": None, "source": "s", "input_id": f"in-{sample_id}", "sha256": "ab",
            "split": "train", "resolution": 256, "bucket_h": 4, "bucket_w": 6, "num_views": 1,
            "modalities": ["image"], "latents": [latent_entry(0, "image", mean, std, "float32")],
            "captions": [{"name": "original", "text": "a cat", "origin": "source"}], "class_colours": "{}",
            "entities": [], "cameras": [], "params": "[]", "image_tokenizer": "pixel", "image_tokenizer_sha": "x",
            "downsample_factor": 2, "text_tokenizer": None}


def test_a_shard_round_trips_through_parquet_bytes_deterministically():
    rng = np.random.default_rng(1)
    mean, std = rng.normal(size=(16, 4, 6)).astype(np.float32), rng.random((16, 4, 6)).astype(np.float32)
    rows = [_row("a", mean, std), _row("b", mean * 2, None)]
    data = parquet_bytes(shard_table(rows))
    assert data == parquet_bytes(shard_table(rows))  # same rows, same bytes: a rewrite after a crash is identical
    table = pq.read_table(io.BytesIO(data))
    check_shard_schema(table.schema, "mem")
    back = table.to_pylist()
    latents = row_latents(back[0])
    np.testing.assert_array_equal(latents[(0, "image")][0], mean)
    np.testing.assert_array_equal(latents[(0, "image")][1], std)
    assert row_latents(back[1])[(0, "image")][1] is None


def test_a_shard_of_another_schema_version_is_refused_naming_the_file():
    table = shard_table([_row("a", np.zeros((16, 1, 1), np.float32), None)])
    old = table.replace_schema_metadata({SCHEMA_METADATA_KEY: b"0"})
    with pytest.raises(ShardSchemaError, match=r"x\.parquet: shard schema version b'0'.*rebuild the data"):
        check_shard_schema(old.schema, "x.parquet")
    with pytest.raises(ShardSchemaError, match="lack columns"):
        shard_table([{"id": "a"}])
    assert set(LATENT_SCHEMA.names) >= {"id", "group_id", "input_id", "sha256", "split", "latents", "cameras"}
    assert isinstance(LATENT_SCHEMA.field("latents").type, pa.ListType)


def test_split_is_a_stable_function_of_the_id():
    ids = [f"web_{i:04d}" for i in range(4000)]
    splits = [split_of(i, 0.1) for i in ids]
    assert splits == [split_of(i, 0.1) for i in ids]
    assert 0.08 < splits.count("heldout") / len(ids) < 0.12
    assert {split_of(i, 0.0) for i in ids} == {"train"} and {split_of(i, 1.0) for i in ids} == {"heldout"}


def test_the_first_duplicate_in_plan_order_wins():
    entries = [{"ids": ["a1", "a2"], "sha256": ["x", "y"]}, {"ids": ["b1", "b2", "b3"], "sha256": ["y", "z", "x"]}]
    assert duplicate_losers(entries) == [{"id": "b1", "sha256": "y", "kept": "a2"},
                                         {"id": "b3", "sha256": "x", "kept": "a1"}]
