"""The build as a cluster runs it: `ray job submit --working-dir . -- python -m pipelines.build --config ...` to the
session's `ray start --head` on 127.0.0.1 writes the same build as the local run (the shared `synthetic_build`,
made by `python -m pipelines.build` with the same config): the same plan, shards, files and manifest, all but the
record of which git commit made them."""

from __future__ import annotations

import subprocess

import pytest

from build_runs import REPO
from onegen.shards import read_entries, read_manifest
from onegen.storage import Storage


@pytest.mark.integration
def test_a_submitted_build_writes_what_the_local_run_wrote(ray_head, synthetic_build, tmp_path):
    from conftest import VENV_BIN

    config = "configs/build/synthetic_small.yaml"
    overrides = [f"run.work_dir={tmp_path / 'work'}", f"storage.root={tmp_path / 'data'}"]  # outside the upload
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".", "--",
           "python", "-m", "pipelines.build", "--config", config]  # as the README says, nothing more
    for item in overrides:
        cmd += ["--set", item]
    result = subprocess.run(cmd, cwd=REPO, env=ray_head["env"], capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in output, output[-5000:]
    assert "build synthetic_small ->" in output  # the closing table, streamed back by `ray job submit`

    submitted, local = Storage(str(tmp_path / "data")), Storage(synthetic_build["root"])
    assert data_of(submitted) == data_of(local)
    assert submitted.read_bytes("builds/synthetic_small/plan.json") == local.read_bytes(
        "builds/synthetic_small/plan.json")
    # The one difference: which code made it. The upload has no .git, so the job records the commit only when it
    # is given (ONEGEN_GIT_COMMIT / ONEGEN_GIT_DIRTY in the runtime env, as onegen.raycluster.job_runtime_env does).
    entry = read_entries(submitted, "synthetic_small")["synth-00000"]
    assert entry["code_version"]["git_commit"] == "unknown"


def data_of(storage: Storage) -> tuple[dict, dict]:
    """The final manifest and every entry, without the code version (and the entry digests that cover it)."""
    manifest = read_manifest(storage, "synthetic_small")
    for shard in manifest["shards"]:
        shard.pop("entry_sha256")
    entries = read_entries(storage, "synthetic_small")
    for entry in entries.values():
        entry.pop("code_version")
    return manifest, entries
