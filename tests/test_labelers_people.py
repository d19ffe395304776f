"""The pose and face labellers (pipelines/pose.py, pipelines/faces.py) on mediapipe's real bundled models (offline,
from its wheel) over real photographs, and identity groups (a folder source with `layout: identities`): in process,
and in a build run as a user runs it, killed and rerun.

scikit-image ships photographs of two people (the astronaut Eileen Collins and the cameraman); an identity folder
needs several pictures of one person, so the tests' identity sets are the astronaut's photograph, its mirror image
and a crop of it (not independent photographs of her: a stated limit), plus a cat (chelsea) and a coffee cup, which
show no face. Where the person and the face are in the astronaut photograph is stated by hand below (read off the
picture on a 64-pixel grid), not taken from the models."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from onegen.build_config import BuildConfig
from onegen.config import load_config

pytest.importorskip("mediapipe", reason="make install installs mediapipe (README: Installing mediapipe)")

# The astronaut photograph (512 x 512), by hand: her head (hair to chin) and her face (brows to chin), and the
# person as a whole (suit and head; the helmet at the bottom right is not her). Boxes are [x0, y0, x1, y1].
ASTRONAUT_HEAD = (150, 15, 305, 195)
ASTRONAUT_FACE = (175, 60, 285, 175)
ASTRONAUT_PERSON = (15, 10, 375, 512)
EYES, SHOULDERS = (1, 2), (5, 6)  # COCO-17 indices


def inside(x: float, y: float, box: tuple) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def rgb(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else np.stack([image] * 3, axis=-1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """astronaut.png, coffee.png (no person), two.png (the astronaut beside her mirror image: two people)."""
    from skimage import data

    folder = tmp_path_factory.mktemp("people")
    astronaut = data.astronaut()
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.png")
    Image.fromarray(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1)).save(folder / "two.png")
    return folder


def write_identities(folder):
    """collins/: the photograph, its mirror image, a crop around her head and shoulders, and the cat (no face);
    cameraman/: his photograph and its mirror image; cup/: one face-less picture and the astronaut once (fewer than
    2 faces: dropped)."""
    from skimage import data

    astronaut = data.astronaut()
    for person in ("collins", "cameraman", "cup"):
        (folder / person).mkdir(parents=True)
    Image.fromarray(astronaut).save(folder / "collins" / "1_photo.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(folder / "collins" / "2_mirror.png")
    Image.fromarray(astronaut[:320, 60:380]).save(folder / "collins" / "3_crop.png")
    Image.fromarray(data.chelsea()).save(folder / "collins" / "4_cat.png")
    camera = rgb(data.camera())
    Image.fromarray(camera).save(folder / "cameraman" / "a.png")
    Image.fromarray(np.ascontiguousarray(camera[:, ::-1])).save(folder / "cameraman" / "b.png")
    Image.fromarray(data.coffee()).save(folder / "cup" / "a.png")
    Image.fromarray(astronaut).save(folder / "cup" / "b.png")
    (folder / "cup" / "notes.txt").write_text("not an image: ignored")
    return folder


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    return write_identities(tmp_path_factory.mktemp("ids") / "people")


def people_cfg(*sources: str, faces: bool = True, pose: bool = True) -> BuildConfig:
    return load_config(None, ["run.name=b", "build.resolutions=[64, 128]", "build.decode.min_size=32",
                              f"build.sources=[{', '.join(sources)}]", "build.conditions.kinds=[canny]",
                              f"build.pose.enabled={str(pose).lower()}", f"build.faces.enabled={str(faces).lower()}"],
                       BuildConfig)


def folder(name: str, path, layout: str = "files") -> str:
    return f"{{name: {name}, type: folder, path: '{path}', layout: {layout}}}"


def processed(cfg: BuildConfig) -> dict[str, dict]:
    """{input file or folder name: its record} through the chain up to the encoder in this process, the enabled
    labellers in their places (pipelines.process.stage_chain): pictures, condition maps and rows."""
    from pipelines.ingest import plan_partitions, read_partition
    from pipelines.labelers import enabled_labelers
    from pipelines.process import run_stages, stage_chain

    stages = [labeler.actor_class()(cfg, labeler.preflight(labeler.section(cfg))) for labeler in enabled_labelers(cfg)]
    records = []
    for partition in plan_partitions(cfg):
        part, _ = read_partition(cfg, partition)
        for step in stage_chain(stages):
            part = run_stages(step, part, cfg) if isinstance(step, tuple) else step.label_records(part)
        records += part
    return {r["input_id"].split("#")[0].rstrip("/").rsplit("/", 1)[-1]: r for r in records}


@pytest.fixture(scope="module")
def stages():
    from pipelines import faces, pose

    cfg = people_cfg("{name: s, type: synthetic, scenes: 1}")
    return {"pose": pose.Stage(cfg, pose.preflight(cfg.build.pose)),
            "faces": faces.Stage(cfg, faces.preflight(cfg.build.faces))}


def test_pose_finds_the_astronaut_with_her_keypoints_on_her(stages):
    from skimage import data

    people = stages["pose"].people(data.astronaut())
    assert people.shape == (1, 17, 3) and people.dtype == np.float32
    person = people[0]
    seen = person[:, 2] > 0
    assert set(np.unique(person[:, 2])) <= {0.0, 2.0} and seen[[0, *EYES, *SHOULDERS]].all()
    assert (person[~seen, :2] == 0).all()  # COCO's absent point
    assert all(inside(x, y, ASTRONAUT_PERSON) for x, y, _ in person[seen])
    assert all(inside(*person[j, :2], ASTRONAUT_FACE) for j in (0, *EYES))  # nose and eyes in her face
    assert all(person[j, 1] > ASTRONAUT_FACE[3] for j in SHOULDERS)  # shoulders below it
    # COCO's left is the person's left: her left eye and shoulder are on the picture's right
    assert person[1, 0] > person[2, 0] and person[5, 0] > person[6, 0]


def test_two_people_side_by_side_are_both_found(stages):
    from skimage import data

    astronaut = data.astronaut()
    people = stages["pose"].people(np.concatenate([astronaut, astronaut[:, ::-1]], axis=1))
    assert people.shape[0] == 2
    noses = sorted(float(p[0, 0]) for p in people)
    mirrored = (1024 - ASTRONAUT_FACE[2], ASTRONAUT_FACE[1], 1024 - ASTRONAUT_FACE[0], ASTRONAUT_FACE[3])
    assert inside(noses[0], 120, (ASTRONAUT_FACE[0], 0, ASTRONAUT_FACE[2], 512))
    assert inside(noses[1], 120, (mirrored[0], 0, mirrored[2], 512))


def test_faces_are_boxed_inside_the_face_and_a_cat_has_none(stages):
    from skimage import data

    found = stages["faces"].faces(data.astronaut())
    assert len(found) == 1 and 0.5 <= found[0]["score"] <= 1
    x0, y0, x1, y1 = found[0]["bbox_2d"]
    assert inside(x0, y0, ASTRONAUT_HEAD) and inside(x1, y1, ASTRONAUT_HEAD)
    assert inside((x0 + x1) / 2, (y0 + y1) / 2, ASTRONAUT_FACE)
    assert stages["faces"].faces(data.chelsea()) == [] and stages["faces"].faces(data.coffee()) == []
    assert stages["pose"].people(data.coffee()).shape == (0, 17, 3)


def test_the_pose_map_is_the_skeleton_of_the_bucketed_keypoints_and_no_person_means_no_map(photos):
    from model.conditions import JOINT_COLOURS, pose_condition
    from pipelines.shard_writer import label_counts

    records = processed(people_cfg(folder("photos", photos)))
    astronaut, coffee, two = records["astronaut.png"], records["coffee.png"], records["two.png"]
    assert astronaut["labels"]["pose"] == "ok" and two["labels"]["pose"] == "ok"
    assert coffee["labels"]["pose"] == "no_person" and not coffee["dropped"]
    assert "no person" in coffee["label_errors"]["pose"]
    assert label_counts(list(records.values()))["pose"] == {"no_person": 1, "ok": 2}
    for output in astronaut["outputs"]:
        sample, drawn = output["samples"][0], output["conditions"][0]["pose"]
        height, width = output["bucket"]
        assert sample.keypoints.shape == (1, 17, 3)
        assert np.array_equal(drawn, pose_condition((height, width), sample.keypoints))  # the one renderer
        for j, (x, y, v) in enumerate(sample.keypoints[0]):  # every visible joint sits on its own colour
            if v > 0 and j not in EYES:  # (the eyes' discs overlap the nose's at 64 px)
                assert tuple(drawn[int(y), int(x)]) == JOINT_COLOURS[j], (output["resolution"], j)
        scale = width / 512  # the square photograph: one scale, no crop
        nose = sample.keypoints[0, 0, :2] / scale
        assert inside(*nose, ASTRONAUT_FACE)
    assert all(len(o["samples"][0].keypoints) == 2 and "pose" in o["conditions"][0] for o in two["outputs"])
    assert all("pose" not in o["conditions"][0] and o["samples"][0].keypoints.shape == (0, 17, 3)
               for o in coffee["outputs"])
    assert all(r["labelled_by"]["pose"].startswith("mediapipe 0.10") for r in records.values())


def test_an_identity_folder_becomes_faceid_groups_of_the_pictures_with_a_face(identities):
    from pipelines.decode import pixels_sha256
    from pipelines.process import group_sha256
    from pipelines.shard_writer import label_counts, left_out_counts

    records = processed(people_cfg(folder("ids", identities, "identities"), pose=False))
    assert sorted(records) == ["cameraman", "collins", "cup"]
    collins, cup = records["collins"], records["cup"]
    assert cup["dropped"] == "too_few_pictures" and "1 picture(s) kept" in cup["error"]
    assert "1 no_face" in cup["error"] and "where the face is clearly visible" in cup["error"]
    assert collins["group_id"] == "collins" and collins["meta"]["identity"] == "collins"
    assert [v["name"].rsplit("/", 1)[-1] for v in collins["views"]] == ["1_photo.png", "2_mirror.png", "3_crop.png"]
    [cat] = collins["meta"]["left_out"]
    assert cat["file"].endswith("collins/4_cat.png") and cat["reason"] == "no_face"
    kept = [r for r in records.values() if not r["dropped"]]
    assert label_counts(kept)["faces"] == {"ok": 2} and left_out_counts(kept) == {"no_face": 1}
    # the group's digest (the duplicate key) covers the pictures it keeps, not the cat
    assert collins["sha256"] == group_sha256([pixels_sha256(s.image) for s in
                                              _full_size(identities / "collins", ["1_photo", "2_mirror", "3_crop"])])
    for output in collins["outputs"]:  # one bucket for the whole group, every view with its face box
        assert len(output["samples"]) == 3 and all(s.image.shape[:2] == output["bucket"] for s in output["samples"])
        assert all(len(s.faces) == 1 for s in output["samples"])
        height, width = output["bucket"]
        x0, y0, x1, y1 = output["samples"][0].faces[0]["bbox_2d"]
        centre = ((x0 + x1) / 2 * 512 / width, (y0 + y1) / 2 * 512 / height)
        assert inside(*centre, ASTRONAUT_FACE)
        mx0, _, mx1, _ = output["samples"][1].faces[0]["bbox_2d"]  # the mirror image's face is mirrored
        assert abs((mx0 + mx1) - (2 * width - (x0 + x1))) <= 4
    rows = collins["rows"]
    assert [row["num_views"] for row in rows] == [3, 3] and {row["group_id"] for row in rows} == {"collins"}
    assert not any(row["cameras"] for row in rows)  # not a multiview scene: the trainer never reads it as one


def _full_size(folder, stems):
    from types import SimpleNamespace

    return [SimpleNamespace(image=np.asarray(Image.open(folder / f"{stem}.png").convert("RGB"))) for stem in stems]


def test_a_bad_or_face_cropped_picture_leaves_its_group_and_a_sixth_face_is_beyond_the_task(tmp_path):
    """One person with a corrupt file, a wide picture whose face the group's (portrait) bucket would crop away, and
    seven more pictures with her face: the group keeps the first five usable ones, in file order."""
    from skimage import data

    from pipelines.shard_writer import left_out_counts

    astronaut = data.astronaut()
    person = tmp_path / "people" / "collins"
    person.mkdir(parents=True)
    Image.fromarray(np.ascontiguousarray(astronaut[:, 96:416])).save(person / "0_portrait.png")  # the bucket: tall
    (person / "1_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    wide = np.concatenate([astronaut, np.zeros((512, 1024, 3), np.uint8)], axis=1)  # her face at the far left
    Image.fromarray(wide).save(person / "2_wide.png")
    for i in range(7):
        Image.fromarray(np.ascontiguousarray(astronaut[8 * i:, 96 - 4 * i:416 + 4 * i])).save(person / f"3_{i}.png")
    pair = np.concatenate([astronaut[:, 96:416], astronaut[:, 96:416][:, ::-1]], axis=1)  # two faces: whose?
    Image.fromarray(np.ascontiguousarray(pair)).save(person / "4_pair.png")
    record = processed(people_cfg(folder("ids", tmp_path / "people", "identities"), pose=False))["collins"]
    assert not record["dropped"]
    kept = [v["name"].rsplit("/", 1)[-1] for v in record["views"]]
    reasons = {item["file"].rsplit("/", 1)[-1]: item["reason"] for item in record["meta"]["left_out"]}
    assert reasons["1_broken.png"] == "not_an_image" and reasons["2_wide.png"] == "face_cropped"
    assert reasons["4_pair.png"] == "several_faces"
    assert [name for name, reason in reasons.items() if reason == "beyond_max_views"] == ["3_4.png", "3_5.png",
                                                                                          "3_6.png"]
    assert kept == ["0_portrait.png", "3_0.png", "3_1.png", "3_2.png", "3_3.png"]
    assert left_out_counts([record]) == {"beyond_max_views": 3, "face_cropped": 1, "not_an_image": 1,
                                         "several_faces": 1}
    for output in record["outputs"]:  # every kept face is whole in the group's bucket
        assert len(output["samples"]) == 5
        assert all(len(s.faces) == 1 and s.faces[0]["score"] >= 0.5 for s in output["samples"])
    assert [row["num_views"] for row in record["rows"]] == [5, 5]


def test_an_identity_group_an_earlier_build_holds_is_a_duplicate_and_a_vanished_picture_leaves_it(identities,
                                                                                                   tmp_path):
    """The duplicate check of an identity group uses the pictures it keeps (the ones an earlier build stored); a
    picture that vanished after the plan leaves its group, it does not drop the person."""
    import shutil

    from pipelines.decode import DropSample
    from pipelines.earlier import hash_keys
    from pipelines.process import bucket_record

    root = tmp_path / "people"
    shutil.copytree(identities, root)
    cfg = people_cfg(folder("ids", root, "identities"), pose=False)
    from pipelines.ingest import plan_partitions, read_partition
    from pipelines.labelers import enabled_labelers
    from pipelines.process import run_stages

    [partition] = plan_partitions(cfg)
    (root / "collins" / "2_mirror.png").unlink()  # after the plan, before the read
    records, _ = read_partition(cfg, partition)
    run_stages(("decode",), records, cfg)
    [faces] = [labeler.actor_class()(cfg, labeler.preflight(labeler.section(cfg))) for labeler in enabled_labelers(cfg)]
    faces.label_records(records)
    collins = next(r for r in records if r["meta"]["identity"] == "collins")
    assert [item["reason"] for item in collins["meta"]["left_out"]] == ["unreadable", "no_face"]
    assert len(collins["views"]) == 2 and not collins["dropped"]
    built = np.sort(hash_keys([collins["sha256"]]))
    with pytest.raises(DropSample, match="an earlier build"):
        bucket_record(cfg, collins, built)


def test_a_face_detector_failure_drops_an_identity_group_but_keeps_a_photo(identities, photos, monkeypatch):
    """An identity group the detector could not check is not written (its references would be unchecked); a single
    photograph keeps its views, counted `error`."""
    from pipelines import faces

    def broken(self, image):
        raise RuntimeError("detector broke")

    monkeypatch.setattr(faces.Stage, "faces", broken)
    monkeypatch.setattr(faces.Stage, "smoke_test", lambda self: None)  # it starts; it fails on the pictures
    records = processed(people_cfg(folder("ids", identities, "identities"), folder("photos", photos), pose=False))
    assert {records[name]["dropped"] for name in ("collins", "cameraman", "cup")} == {"error_faces"}
    assert "detector broke" in records["collins"]["error"]
    assert not records["astronaut.png"]["dropped"] and records["astronaut.png"]["labels"]["faces"] == "error"


def test_identity_layout_plan_and_config():
    import tempfile
    from pathlib import Path

    from pipelines.sources.folder import plan_folder_partitions

    with tempfile.TemporaryDirectory() as tmp:
        root = write_identities(Path(tmp) / "people")
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "single.png")
        entries = [e for spec in plan_folder_partitions(str(root), 2, layout="identities") for e in spec["entries"]]
        assert [e.get("identity", e.get("path")) for e in entries] == ["cameraman", "collins", "cup", "single.png"]
        assert [f["path"] for f in entries[2]["files"]] == ["cup/a.png", "cup/b.png"]  # notes.txt is no picture
        files = [e.get("path") or e.get("group") for spec in plan_folder_partitions(str(root), 9)
                 for e in spec["entries"]]
        assert "collins/1_photo.png" in files  # the default layout: every image a sample
    with pytest.raises(Exception, match="enable build.faces"):
        people_cfg(folder("ids", "/x", "identities"), faces=False)


def test_the_preflight_refuses_what_mediapipe_cannot_run(photos):
    from pipelines import faces, pose

    cfg = people_cfg(folder("photos", photos))
    with pytest.raises(ValueError, match="pose_landmark_full"):
        pose.preflight(cfg.build.pose.model_copy(update={"model": "pose_landmark_heavy"}))
    with pytest.raises(ValueError, match="num_gpus: 0"):
        faces.preflight(cfg.build.faces.model_copy(update={"num_gpus": 1.0}))
    found = pose.preflight(cfg.build.pose)
    assert found["version"].startswith("0.10") and len(found["sha256"]) == 64


@pytest.mark.integration
def test_a_build_with_identity_groups_survives_a_kill_and_inspect_shows_the_labels(identities, photos, tmp_path,
                                                                                  ray_head):
    """The identity shard is the build's first commit: killed while its tar is half written, the rerun finishes with
    the same manifest and shards as a build that was never killed."""
    from onegen.dataset import open_build
    from onegen.storage import Storage
    from pipelines.inspect_build import format_summary, inspect_build
    from tests.build_runs import manifest_view, ok, run_build, write_config

    sources = [{"name": "ids", "type": "folder", "path": str(identities), "layout": "identities"},
               {"name": "photos", "type": "folder", "path": str(photos)}]
    settings = dict(resolutions=[64], decode={"min_size": 32}, conditions={"kinds": ["canny"]},
                    pose={"enabled": True}, faces={"enabled": True})
    reference = write_config(tmp_path / "ref.yaml", tmp_path / "ref", sources, **settings)
    config = write_config(tmp_path / "build.yaml", tmp_path, sources, **settings)
    ok(run_build(ray_head, reference))
    assert run_build(ray_head, config, extra_env={"ONEGEN_CRASH_AT": "mid_tar"}).returncode == -9
    result = ok(run_build(ray_head, config))
    assert "faces labels: 1 no_face, 4 ok" in result.stdout
    assert "pictures left out of their groups: 1 no_face" in result.stdout
    assert "pose labels: 1 no_person, 4 ok" in result.stdout and "too_few_pictures" in result.stdout
    storage = Storage(str(tmp_path / "data"))
    assert manifest_view(storage) == manifest_view(Storage(str(tmp_path / "ref" / "data")))
    build = open_build("b", storage_root=str(tmp_path / "data"))
    groups = {row["group_id"]: row for row in build.rows() if row["source"] == "ids"}
    assert sorted(groups) == ["cameraman", "collins"] and groups["collins"]["num_views"] == 3
    assert {m for m in groups["collins"]["modalities"]} >= {"image", "pose"}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes("builds/b/images/ids-00000.tar"))) as tar:
        documents = {m.name: json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                     if m.name.endswith(".json")}
    collins = sorted((name, doc) for name, doc in documents.items() if doc["meta"]["build"]["identity"] == "collins")
    assert len(collins) == 3 and all(len(doc["faces"]) == 1 for _, doc in collins)
    assert all(doc["meta"]["build"]["labels"]["faces"] == "ok" for _, doc in collins)
    inspection = inspect_build(str(tmp_path / "data" / "builds" / "b"), out=str(tmp_path / "sheet.png"), samples=6)
    text = format_summary(inspection.summary)
    assert "faces labels (samples): no_face 1, ok 4" in text, text
    assert "pictures left out of their groups: no_face 1" in text, text
    assert build.manifest()["totals"]["left_out"] == {"no_face": 1}
    assert "pose labels (samples): no_person 1, ok 4" in text, text
    assert "pose" in {cell["modality"] for cell in inspection.cells}


def test_the_readme_shows_the_pose_and_faces_defaults():
    import yaml

    from onegen.build_config import FacesSection, PoseSection
    from tests.test_readme import fenced_block

    shown = yaml.safe_load(fenced_block("### People: pose skeletons and identity groups", "yaml"))["build"]
    for name, section in (("pose", PoseSection), ("faces", FacesSection)):
        assert section(**shown[name]) == section() and set(shown[name]) == set(section.model_fields), name


def test_actor_pools_that_cannot_fit_the_local_cpus_are_refused(photos, monkeypatch):
    """The actors hold their CPUs for the whole job: more than a local instance has would wait for ever."""
    from types import SimpleNamespace

    from onegen.errors import UsageError
    from pipelines.build import check_actor_cpus
    from pipelines.labelers import enabled_labelers

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = people_cfg(folder("photos", photos))  # faces 0.5 + pose 0.5 + encode 0.5, and 0.5 for the tasks
    cluster = lambda cpus: SimpleNamespace(cluster_resources=lambda: {"CPU": cpus})  # noqa: E731
    check_actor_cpus(cluster(2.0), cfg, enabled_labelers(cfg))
    with pytest.raises(UsageError, match=r"hold 1.5 CPUs \(build.faces: 1 x 0.5, build.pose: 1 x 0.5, build.encode: "
                                         r"1 x 0.5\).*Ray cluster has 1.5.*ray.num_cpus"):
        check_actor_cpus(cluster(1.5), cfg, enabled_labelers(cfg))


def test_a_rerun_refuses_another_mediapipe_than_the_first_run_labelled_with(photos):
    """The plan freezes the bundled model's digest; a node with another mediapipe would mix two models' labels."""
    from types import SimpleNamespace

    from onegen.errors import UsageError
    from pipelines.labelers import preflight_labelers

    class Ref:
        def __init__(self, value):
            self.value = value

    class LocalRay:  # preflight_labelers' use of Ray, run in this process
        exceptions = SimpleNamespace(GetTimeoutError=TimeoutError, RayError=RuntimeError)

        @staticmethod
        def remote(fn):
            return SimpleNamespace(options=lambda **_: SimpleNamespace(remote=lambda *a: Ref(fn(*a))))

        @staticmethod
        def get(ref, timeout=None):
            return ref.value

    cfg = people_cfg(folder("photos", photos))
    first = preflight_labelers(LocalRay, cfg)
    assert preflight_labelers(LocalRay, cfg, first) == first
    moved = {**first, "pose": {**first["pose"], "sha256": "0" * 64, "version": "0.10.9"}}
    with pytest.raises(UsageError, match=r"build.pose: this build's first run labelled with pose_landmark_full "
                                         r"sha256 000000000000 \(version 0.10.9\)"):
        preflight_labelers(LocalRay, cfg, moved)


def test_a_node_with_another_mediapipe_model_refuses_to_start(photos):
    from pipelines import pose

    cfg = people_cfg(folder("photos", photos))
    resolved = pose.preflight(cfg.build.pose)
    with pytest.raises(RuntimeError, match=r"build.pose: its model 'pose_landmark_full' could not start on node .*"
                                           r"install the same version on every node.*make install"):
        pose.Stage(cfg, {**resolved, "sha256": "0" * 64})
    with pytest.raises(Exception, match="no hub revision"):
        people_cfg(folder("photos", photos)).build.pose.model_validate({"enabled": True, "dtype": "bfloat16"})
