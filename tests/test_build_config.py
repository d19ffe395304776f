"""`onegen build`'s config: sources by type, errors that name the key, and which keys are content."""

from __future__ import annotations

from pathlib import Path

import pytest

from onegen.build_config import BuildConfig
from onegen.config import SCHEMAS, ConfigError, config_hash, content_hash, load_config

REPO = Path(__file__).resolve().parents[1]
SYNTH = "build.sources=[{name: synth, type: synthetic, scenes: 4}]"


def build_cfg(*overrides: str) -> BuildConfig:
    return load_config(None, ["run.name=b", *overrides], BuildConfig)


def test_sources_are_typed_by_their_type_key():
    cfg = build_cfg("build.sources=[{name: web, type: urls, files: [a.csv]}, {name: pics, type: folder, path: /p},"
                    " {name: old, type: webdataset, paths: [s3://b/x/]}, {name: synth, type: synthetic}]")
    assert [type(s).__name__ for s in cfg.build.sources] == ["UrlSource", "FolderSource", "WebDatasetSource",
                                                            "SyntheticSource"]
    assert cfg.build_name == "b" and SCHEMAS["build"] is BuildConfig
    with pytest.raises(ConfigError, match=r"build\.sources\[0\]: source 'web': name its url lists: files: "):
        build_cfg("build.sources=[{name: web, type: urls}]")
    assert build_cfg("build.sources=[{name: web, type: urls, path: l.csv, files: [a.csv]}]").build.sources[0].lists \
        == ["a.csv", "l.csv"]
    with pytest.raises(ConfigError, match="one tar per partition.*remove partition_size"):
        build_cfg("build.sources=[{name: w, type: webdataset, paths: [a.tar], partition_size: 3}]")
    with pytest.raises(ConfigError, match=r"build\.sources\[0\]"):
        build_cfg("build.sources=[{name: web, type: ftp}]")


def test_source_names_are_unique_and_shard_safe():
    with pytest.raises(ConfigError, match=r"repeated: \['s'\]"):
        build_cfg("build.sources=[{name: s, type: synthetic}, {name: s, type: synthetic}]")
    with pytest.raises(ConfigError, match=r"build\.sources\[0\]\.name"):
        build_cfg("build.sources=[{name: Bad-Name, type: synthetic}]")
    with pytest.raises(ConfigError, match=r"build\.sources: .*at least 1"):
        build_cfg("build.sources=[]")


def test_bad_ranges_and_resolutions_are_refused():
    with pytest.raises(ConfigError, match="blur_sigma"):
        build_cfg(SYNTH, "build.conditions.blur_sigma=[3, 1]")
    with pytest.raises(ConfigError, match="build.resolutions"):
        build_cfg(SYNTH, "build.resolutions=[300]")
    assert build_cfg(SYNTH, "build.resolutions=[512, 256]").build.resolutions == [256, 512]


def test_condition_settings_ranges_single_numbers_and_refusals():
    conditions = build_cfg(SYNTH).build.conditions
    assert conditions.canny_low == (80, 120) and conditions.blur_kernel == (7, 21)
    assert conditions.inpaint_shapes == ["rectangle", "rectangles", "strokes"]
    fixed = build_cfg(SYNTH, "build.conditions.canny_low=100", "build.conditions.canny_high=200",
                      "build.conditions.blur_kernel=null", "build.conditions.inpaint_shapes=[strokes]").build.conditions
    assert fixed.canny_low == (100, 100) and fixed.canny_high == (200, 200) and fixed.blur_kernel is None
    for override, message in (("build.conditions.blur_kernel=[4, 9]", "blur_kernel: expected odd sizes"),
                              ("build.conditions.canny_low=[100, 200]", "must end at or below where"),
                              ("build.conditions.canny_high=[250, 200]", "canny_high: expected 0 <= low <= high"),
                              ("build.conditions.inpaint_shapes=[]", "inpaint_shapes"),
                              ("build.conditions.inpaint_shapes=[circle]", "inpaint_shapes")):
        with pytest.raises(ConfigError, match=message):
            build_cfg(SYNTH, override)


def test_every_condition_kind_writes_a_modality_named_by_a_task_view_role():
    from model.conditions import MASK_SHAPES as RENDERER_SHAPES
    from model.tasks import TASKS
    from onegen.build_config import CONDITION_KINDS, CONDITION_MODALITIES, LABEL_MODALITIES, MASK_SHAPES, SYNTHETIC_MAPS
    from onegen.shards import MODALITIES

    assert set(CONDITION_MODALITIES) == set(CONDITION_KINDS) and set(LABEL_MODALITIES) == set(SYNTHETIC_MAPS)
    roles = {role for task in TASKS.values() for role in task.view_roles}
    written = {"image", *CONDITION_MODALITIES.values(), *LABEL_MODALITIES.values()}
    assert written == set(MODALITIES) and written <= roles
    assert MASK_SHAPES == RENDERER_SHAPES


def test_a_vae_that_downsamples_more_than_the_buckets_allow_is_refused_from_its_config(tmp_path):
    import json

    f16 = tmp_path / "vae16"
    f16.mkdir()
    (f16 / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [8] * 5}))
    with pytest.raises(ConfigError, match=r"encode.image_tokenizer: .*downsamples by 16.*f=8"):
        build_cfg(SYNTH, f"build.encode.image_tokenizer={f16}")
    (f16 / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [8] * 4}))
    assert build_cfg(SYNTH, f"build.encode.image_tokenizer={f16}").build.encode.image_tokenizer == str(f16)


def test_how_the_job_runs_is_not_content_but_what_it_writes_is():
    base = build_cfg(SYNTH)
    for runtime in ("build.stages.batch_size=3", "build.encode.concurrency=4", "build.encode.num_gpus=1",
                    "build.name=other", "ray.num_cpus=7"):
        cfg = build_cfg(SYNTH, runtime)
        assert content_hash(cfg) == content_hash(base), runtime
        assert config_hash(cfg) != config_hash(base), runtime
    urls = "build.sources=[{name: web, type: urls, files: [a.csv]}]"
    assert content_hash(build_cfg(urls, "build.sources[0].threads=2")) == content_hash(build_cfg(urls))
    for content in ("build.sources[0].scenes=5", "build.resolutions=[512]", "build.encode.latent_dtype=bfloat16",
                    "run.seed=3", "build.conditions.canny_low=50", "build.decode.min_size=32"):
        assert content_hash(build_cfg(SYNTH, content)) != content_hash(base), content


def test_a_key_of_the_commands_own_section_may_leave_the_section_out():
    folder = REPO / "configs/build/folder.yaml"
    cfg = load_config(folder, ["sources[0].path=/data/photos", "resolutions=[64]"], BuildConfig)
    assert cfg.build.sources[0].path == "/data/photos" and cfg.build.resolutions == [64]
    with pytest.raises(ConfigError, match="sources.*no such item"):
        load_config(folder, ["sources[3].path=/x"], BuildConfig)
    with pytest.raises(ConfigError, match="nope: unknown key"):
        load_config(folder, ["nope=1"], BuildConfig)


def test_where_the_inputs_sit_is_not_content():
    folder = REPO / "configs/build/folder.yaml"
    here = load_config(folder, ["sources[0].path=/a"], BuildConfig)
    there = load_config(folder, ["sources[0].path=/b"], BuildConfig)
    assert content_hash(here) == content_hash(there) and config_hash(here) == config_hash(there)
    assert content_hash(load_config(folder, ["sources[0].partition_size=3"], BuildConfig)) != content_hash(here)


@pytest.mark.parametrize("name", ["synthetic", "synthetic_small", "folder", "urls"])
def test_the_shipped_build_configs_validate(name):
    cfg = load_config(REPO / f"configs/build/{name}.yaml", [], BuildConfig)
    assert cfg.build_name == name


def test_a_field_added_later_leaves_earlier_builds_hashes_as_they_were():
    """The folder source's `layout` came after folder builds existed: at its default it is not hashed, so those
    builds resume (values computed with the code before the field)."""
    repo = Path(__file__).resolve().parents[1]
    pinned = {repo / "configs/build/folder.yaml": ("b9a7ff691e4590969bbc2f6769b4a76fa2a7ad5470cf2f258d638814a8b530e1",
                                            "d605864db58ad2de6df8e4265d87125941ab5362cd9a078d9f062cd41234238c")}
    for path, (content, full) in pinned.items():
        cfg = load_config(path, [], BuildConfig)
        assert (content_hash(cfg), config_hash(cfg)) == (content, full), path
        files, identities = (load_config(path, [f"sources[0].layout={layout}", "faces.enabled=true"], BuildConfig)
                             for layout in ("files", "identities"))
        assert content_hash(files) != content_hash(identities)  # set, the field is hashed
