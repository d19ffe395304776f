"""model/tasks.py: every task of spec §5.1 with its exact token, frame order, directions and prompt syntax."""

import pytest

from model.tasks import (
    PALETTE,
    TASKS,
    colour_entry,
    get_task,
    multiview_roles,
    multiview_target_mask,
    parse_prompt,
    task_from_prompt,
)

# spec §5.1, exact strings
SPEC_TOKENS = {
    "text2image": "[[text2image]]",
    "deblurring": "[[deblurring]]",
    "image_inpainting": "[[image_inpainting]]",
    "canny2image": "[[canny2image]]",
    "depth2image": "[[depth2image]]",
    "hed2img": "[[hed2img]]",
    "pose2image": "[[pose2image]]",
    "semanticmap2image": "[[semanticmap2image]]",
    "boundingbox2image": "[[boundingbox2image]]",
    "image_editing": "[[image_editing]]",
    "faceid": "[[faceid]]",
    "multiview": "[[multiview]]",
    "subject_driven": "[[subject_driven]]",
}


def test_registry_has_every_spec_task_with_its_exact_token():
    assert {name: task.token for name, task in TASKS.items()} == SPEC_TOKENS


def test_palette_is_the_twenty_prompt_colours():
    assert len(PALETTE) == 20
    assert PALETTE["cyan"] == "#00FFFF" and PALETTE["orchid"] == "#DA70D6" and PALETTE["darkorange"] == "#FF8C00"
    assert len(set(PALETTE.values())) == 20


@pytest.mark.parametrize("name", ["canny2image", "depth2image", "hed2img", "pose2image", "semanticmap2image",
                                  "boundingbox2image"])
def test_condition_tasks_run_both_ways_with_image_first(name):
    task = get_task(name)
    assert task.view_roles[0] == "image" and task.num_views == 2
    assert task.target_mask("generate") == (True, False)  # denoise_mask=[1, 0]: condition -> image
    assert task.target_mask("estimate") == (False, True)  # denoise_mask=[0, 1]: image -> condition


@pytest.mark.parametrize("name", ["deblurring", "image_inpainting", "image_editing"])
def test_restoration_tasks_generate_the_image_from_frame_one(name):
    task = get_task(name)
    assert task.target_mask("generate") == (True, False)
    with pytest.raises(ValueError, match="no direction"):
        task.target_mask("estimate")


def test_text2image_is_one_view():
    task = get_task("text2image")
    assert task.view_roles == ("image",) and task.target_mask("generate") == (True,)
    assert task.build_prompt("  a  cat\n on a mat ") == "[[text2image]] a cat on a mat"
    with pytest.raises(ValueError, match="1..1 views"):
        task.target_mask("generate", 2)


def test_faceid_prompt_and_reference_views():
    task = get_task("faceid")
    prompt = task.build_prompt("A woman in a red dress.", reference_captions=["A woman smiling.", "A woman reading."])
    assert prompt == "[[faceid]] [[img0]] A woman in a red dress. [[img1]] A woman smiling. [[img2]] A woman reading."
    assert task.view_roles_for(3) == ("image", "reference", "reference")
    assert task.target_mask("generate", 4) == (True, False, False, False)
    with pytest.raises(ValueError, match="2..5 views"):
        task.view_roles_for(6)


def test_subject_driven_prompt():
    task = get_task("subject_driven")
    prompt = task.build_prompt("A cartoon dog surfing.", item="cartoon dog", reference_captions=["A cartoon dog."])
    assert prompt == "[[subject_driven]] <item: cartoon dog> [[img0]] A cartoon dog surfing. [[img1]] A cartoon dog."
    with pytest.raises(ValueError, match="item"):
        task.build_prompt("x", reference_captions=["y"])


def test_semantic_and_box_prompts_use_the_colour_syntax():
    semantic = get_task("semanticmap2image").build_prompt(
        "a dragon over a city", entries=[("dragon", "cyan"), ("birds", "red")])
    assert semantic == ("[[semanticmap2image]] <#00FFFF cyan mask: dragon> <#FF0000 red mask: birds> "
                        "a dragon over a city")
    box = get_task("boundingbox2image").build_prompt("", entries=[("head", "cyan")])
    assert box == "[[boundingbox2image]] <#00FFFF cyan boundingbox: head>"
    with pytest.raises(ValueError, match="20 prompt colours"):
        colour_entry("dragon", "chartreuse")
    with pytest.raises(TypeError, match="unexpected"):
        get_task("depth2image").build_prompt("x", entries=[("a", "red")])


def test_multiview_frame_order_and_directions():
    task = get_task("multiview")
    assert task.build_prompt("a red chair") == "[[multiview]] a red chair"
    assert task.build_prompt("") == "[[multiview]]"
    assert multiview_roles(3) == ("image", "rays") * 3
    assert task.view_roles_for(6) == ("image", "rays", "image", "rays", "image", "rays")
    # NVS: image 0 and every camera known; pose estimation: images known, rays denoised; text->multiview
    assert task.target_mask("novel_view_synthesis", 6) == (False, False, True, False, True, False)
    assert task.target_mask("pose_estimation", 6) == (False, True, False, True, False, True)
    assert task.target_mask("text_to_multiview", 6) == (True, False, True, False, True, False)
    assert multiview_target_mask(3, known_images=(0, 2)) == (False, False, True, False, False, False)
    assert multiview_target_mask(2, known_images=(0, 1), known_rays=(0,)) == (False, False, False, True)
    with pytest.raises(ValueError, match="even"):
        task.view_roles_for(5)
    with pytest.raises(ValueError, match="out of range"):
        multiview_target_mask(2, known_images=(2,))


def test_get_task_accepts_tokens_and_aliases_and_names_the_valid_tasks():
    assert get_task("[[hed2img]]") is TASKS["hed2img"]
    assert get_task("semantic2image") is TASKS["semanticmap2image"]  # the paper's spelling
    with pytest.raises(KeyError, match="valid names: text2image"):
        get_task("depth")


def test_parse_prompt_finds_the_task_token():
    task, rest = parse_prompt("[[faceid]] [[img0]] a man [[img1]] a man smiling")
    assert task is TASKS["faceid"] and rest == "[[img0]] a man [[img1]] a man smiling"
    assert task_from_prompt(get_task("depth2image").build_prompt("a room")) is TASKS["depth2image"]
    assert parse_prompt("no token here") == (None, "no token here")
    with pytest.raises(KeyError, match="no task token"):
        task_from_prompt("[[img0]] only an image marker")


def test_every_task_round_trips_through_its_prompt():
    kwargs = {"faceid": dict(reference_captions=["r"]), "subject_driven": dict(item="x", reference_captions=["r"])}
    for name, task in TASKS.items():
        assert task_from_prompt(task.build_prompt("caption", **kwargs.get(name, {}))) is task
        for direction in task.directions:
            mask = task.target_mask(direction)
            assert len(mask) == task.num_views and any(mask)


def test_prompts_match_the_release_examples():
    # inference.py (ID customization; its line continuations leave runs of spaces, which T5 collapses anyway)
    faceid = get_task("faceid").build_prompt(
        "A woman dressed in traditional attire with intricate headpieces.",
        reference_captions=["A woman with long dark hair.", "A woman in traditional clothing."])
    assert faceid == ("[[faceid]] [[img0]] A woman dressed in traditional attire with intricate headpieces. "
                      "[[img1]] A woman with long dark hair. [[img2]] A woman in traditional clothing.")
    # inference.py (depth estimation and image -> multiview), multiview loader ("[[multiview]] " + caption or token)
    assert get_task("depth2image").build_prompt("cat sitting on a table") == "[[depth2image]] cat sitting on a table"
    assert get_task("depth2image").build_prompt() == "[[depth2image]]"
    assert get_task("multiview").build_prompt("A cat.") == "[[multiview]] A cat."
    # PROMPT_GUIDE §3.1 additional tokens; gradio_demo.py's format_prompt templates
    assert get_task("semanticmap2image").build_prompt("x", entries=[("object", "cyan")]) == \
        "[[semanticmap2image]] <#00FFFF cyan mask: object> x"
    assert get_task("subject_driven").build_prompt("target", item="name", reference_captions=["source"]) == \
        "[[subject_driven]] <item: name> [[img0]] target [[img1]] source"
    assert get_task("image_editing").build_prompt("make it snow") == "[[image_editing]] make it snow"
