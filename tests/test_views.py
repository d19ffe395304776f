"""model/views.py: the one view-sequence and batch layer of the pipeline and the trainer."""

import pytest
import torch

from model import cameras as camera_utils
from model.tasks import get_task
from model.views import RAY_ROLE, build_sample, collate, full_prompt, ray_frames, stack, view_layout


def test_layouts_follow_the_task_frame_orders():
    depth = view_layout("depth2image", direction="estimate")
    assert depth.roles == ("image", "depth") and depth.target_mask == (False, True)
    assert depth.picture_conditions == [0] and depth.picture_targets == [1]
    faceid = view_layout("faceid", num_images=3)
    assert faceid.num_views == 4 and faceid.target_mask == (True, False, False, False)
    nvs = view_layout("multiview", direction="novel_view_synthesis", num_cameras=3)
    assert nvs.roles == ("image", RAY_ROLE) * 3 and nvs.ray_conditions == [1, 3, 5] and nvs.picture_targets == [2, 4]
    pose = view_layout("multiview", direction="pose_estimation", num_images=2)
    assert pose.ray_targets == [1, 3] and pose.picture_conditions == [0, 2]
    explicit = view_layout("depth2image", denoise_mask=[0, 1])
    assert explicit == depth
    with pytest.raises(ValueError, match="needs cameras"):
        view_layout("multiview", direction="novel_view_synthesis")
    with pytest.raises(ValueError, match="either direction= or denoise_mask="):
        view_layout("depth2image", direction="estimate", denoise_mask=[0, 1])
    with pytest.raises(ValueError, match="1 condition image"):
        depth.check_images(2)


def test_prompts_get_the_task_syntax_once():
    task = get_task("semanticmap2image")
    prompt = full_prompt(task, "a dragon", {"entries": [("dragon", "cyan")]})
    assert prompt == "[[semanticmap2image]] <#00FFFF cyan mask: dragon> a dragon"
    assert full_prompt(task, prompt) == prompt
    with pytest.raises(ValueError, match="task='semanticmap2image'"):
        full_prompt(task, "[[depth2image]] a dragon")


def test_training_samples_carry_every_ray_frame_relative_to_camera_zero():
    cameras = [(0, 10), (60, 20, 1.5), (120, 0)]
    layout = view_layout("multiview", direction="novel_view_synthesis", num_cameras=3)
    pictures = {i: torch.randn(16, 4, 4) for i in (0, 2, 4)}
    sample = build_sample(layout, "[[multiview]]", size=(4, 4), picture_latents=pictures, cameras=cameras,
                          ray_views=[1, 3, 5])
    expected = camera_utils.ray_latents_from_spherical([0, 60, 120], [10, 20, 0], [camera_utils.RELEASE_DISTANCE, 1.5,
                                                       camera_utils.RELEASE_DISTANCE], height=4, width=4)
    torch.testing.assert_close(sample.latents[[1, 3, 5]], expected)
    for index, latent in pictures.items():
        assert torch.equal(sample.latents[index], latent)
    # relative to the first camera whose rays are given: camera 0's own ray frame is the identity pose's
    assert torch.allclose(ray_frames(cameras, 3, [0], 4, 4)[0], expected[0])
    with pytest.raises(ValueError, match="ray frame"):
        build_sample(layout, "", size=(4, 4), picture_latents={1: torch.zeros(16, 4, 4)}, cameras=cameras)
    with pytest.raises(ValueError, match="pass cameras="):
        build_sample(layout, "", size=(4, 4), picture_latents=pictures)


def test_collate_groups_by_views_and_size_keeping_order():
    t2i = view_layout("text2image")
    depth = view_layout("depth2image", direction="estimate")
    samples = [
        build_sample(t2i, "a", size=(4, 4)),
        build_sample(depth, "b", size=(4, 4), picture_latents={0: torch.ones(16, 4, 4)}),
        build_sample(t2i, "c", size=(4, 6)),
        build_sample(t2i, "d", size=(4, 4)),
        build_sample(depth, "e", size=(4, 4), picture_latents={0: torch.full((16, 4, 4), 2.0)}),
    ]
    batches = collate(samples)
    assert [b.prompts for b in batches] == [["a", "d"], ["b", "e"], ["c"]]
    depth_batch = batches[1]
    assert depth_batch.latents.shape == (2, 2, 16, 4, 4) and depth_batch.tasks == ["depth2image"] * 2
    assert depth_batch.target_mask.tolist() == [[False, True]] * 2
    assert depth_batch.condition_mask.tolist() == [[True, False]] * 2 and depth_batch.view_mask.all()
    assert torch.equal(depth_batch.latents[1, 0], torch.full((16, 4, 4), 2.0))
    assert depth_batch.to("cpu").latents.data_ptr() == depth_batch.latents.data_ptr()
    with pytest.raises(ValueError, match="cannot share a batch"):
        stack(samples[:3])
