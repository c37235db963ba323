"""LLaVA-OneVision: SigLIP tower, Qwen2 LM, anyres_max downsampling; parity with HF stage by stage."""

import pytest
import torch
from transformers import LlavaOnevisionProcessor

from vlm_lens import HookedVLM
from vlm_lens.architectures.llava_next.testing import (
    PROMPT,
    PROMPTS,
    SIZES,
    assert_stages_match,
    changed_tokens,
    hf_inputs,
    image,
    load_pair,
    save_model,
    tiny_onevision_config,
)
from vlm_lens.architectures.llava_onevision.processor import LlavaOnevisionImageProcessor
from vlm_lens.inputs import inputs_from_tokens


@pytest.fixture(scope="module")
def ov_pair(tmp_path_factory):
    return load_pair(tmp_path_factory.mktemp("onevision"), tiny_onevision_config())


def test_loads_siglip_qwen2_and_an_image_processor_without_torchvision(ov_pair):
    model, _ = ov_pair
    assert model.vlm_cfg.vision.family == "siglip" and model.cfg.original_architecture == "Qwen2ForCausalLM"
    assert type(model.pipeline).__name__ == "AnyResMaxPipeline" and model.vlm_cfg.max_crop_tiles == 2
    # the saved folder names the stock processor and a video processor, which needs torchvision
    assert isinstance(model.processor, LlavaOnevisionImageProcessor)
    assert isinstance(model.processor, LlavaOnevisionProcessor)
    assert model.processor.vision_aspect_ratio == "anyres_max_2"


@pytest.mark.parametrize("shape", list(SIZES))
def test_parity_per_pinpoint(ov_pair, shape):
    model, hf = ov_pair
    inputs = model.prepare(PROMPT, images=[image(SIZES[shape], seed=1)])
    assert_stages_match(model, hf, inputs)


def test_large_crop_grids_are_downsampled(ov_pair):
    model, _ = ov_pair
    inputs = model.prepare(PROMPT, images=[image(SIZES["square"], seed=1)])
    plan = model.pipeline.plans(model, inputs.extras)[0]
    assert (plan.rows, plan.cols) == ((0, 8), (0, 8)) and plan.shape == (5, 5)  # sqrt(64 / 32) > 1.1
    assert inputs.layout.crop_grid(0).shape == (5, 5) and len(inputs.layout.newlines(0)) == 5


def test_parity_batch_of_two_sizes(ov_pair):
    model, hf = ov_pair
    inputs = model.prepare(PROMPTS, images=[[image(SIZES["tall"], 2)], [image(SIZES["square"], 3)]])
    assert_stages_match(model, hf, inputs, padded=True)


def test_multi_image_prompt_keeps_one_tile_per_image(ov_pair):
    """With batch_num_images > 1 (HF's nested image lists) each image is one padded tile + a newline."""
    model, hf = ov_pair
    encoded = model.processor(text=["USER : <image> <image>\nwhat is this ?"],
                              images=[[image(SIZES["wide"], 4), image(SIZES["tall"], 5)]], return_tensors="pt")
    assert encoded["batch_num_images"].tolist() == [2]
    extras = {k: encoded[k] for k in ("image_sizes", "batch_num_images")}
    inputs = inputs_from_tokens(model, encoded["input_ids"], encoded["pixel_values"], encoded["attention_mask"], **extras)
    layout = inputs.layout
    assert layout.n_images == 2 and layout.spans[0].crop_grid is None and len(layout.newlines(1)) == 1
    assert layout.spans[0].end - layout.spans[0].start == 17
    assert_stages_match(model, hf, inputs)


def test_prepare_groups_images_per_prompt_as_the_processor_does(ov_pair):
    """model.prepare passes the processor one flat list: it is regrouped per prompt, so a two-image prompt
    gets one tile per image and a one-image prompt beside it is tiled, as HF's nested lists give."""
    model, hf = ov_pair
    prompts = ["USER : <image> <image>\nwhat is this ?", PROMPT]
    images = [[image(SIZES["wide"], 4), image(SIZES["tall"], 5)], [image(SIZES["square"], 6)]]
    inputs = model.prepare(prompts, images=images)
    encoded = model.processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left")
    assert inputs.extras["batch_num_images"].tolist() == [2, 1]
    assert torch.equal(inputs.tokens, encoded["input_ids"])
    assert [s.crop_grid is None for s in inputs.layout.spans] == [True, True, False]
    with torch.no_grad():
        ref = hf(**hf_inputs(inputs, padded=True)).logits
        ours = model(inputs)
    real = inputs.attention_mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= 1e-4


def test_clip_tower(tmp_path):
    model, hf = load_pair(tmp_path, tiny_onevision_config("clip", "llama", vision_feature_layer=-2,
                                                          vision_aspect_ratio="anyres_max_1"))
    assert model.vlm_cfg.vision.family == "clip"
    assert_stages_match(model, hf, model.prepare(PROMPT, images=[image(SIZES["wide"], 6)]))


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf(ov_pair, use_cache):
    model, hf = ov_pair
    inputs = model.prepare(PROMPTS, images=[[image(SIZES["square"], 7)], [image(SIZES["wide"], 8)]])
    ours = model.generate(inputs, max_new_tokens=5, use_past_kv_cache=use_cache)
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(inputs), max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=2)
    assert torch.equal(ours, ref)


@pytest.fixture(scope="module")
def unmixed(tmp_path_factory):
    path, _ = save_model(tmp_path_factory.mktemp("onevision0"), tiny_onevision_config(vision_feature_layer=0),
                         resample=0)
    return HookedVLM.from_pretrained_no_processing(str(path))


@pytest.mark.parametrize("size, box", [((32, 32), (8, 16, 16, 24)), ((20, 20), (5, 5, 10, 10)),
                                       ((32, 8), (8, 4, 16, 8))])
def test_layout_regions_survive_downsampling(unmixed, size, box):
    layout, changed = changed_tokens(unmixed, image(size, 9), box)
    assert changed == set(layout.positions_in_box(0, box).tolist())
    assert changed & set(layout.crop_grid(0).flatten().tolist()) and not changed & set(layout.newlines(0).tolist())


def test_tiles_with_a_pixel_remainder(tmp_path):
    """18-px tiles of 4-px patches leave 2 px per tile unseen (as SigLIP-so400m's 384-px tiles of 14-px patches
    do): parity still holds and the regions skip the unseen strips (no downsampling here: a downsampled
    token's box bounds its sources, and so spans the strip between two tiles' sources)."""
    config = tiny_onevision_config(vision={"image_size": 18}, vision_feature_layer=[0],  # HF fails on a bare 0
                                   image_grid_pinpoints=[[18, 18], [18, 36], [36, 18], [36, 36]],
                                   vision_aspect_ratio="anyres_max_9")
    model, hf = load_pair(tmp_path, config, resample=0)
    img = image((36, 36), 10)
    assert_stages_match(model, hf, model.prepare(PROMPT, images=[img]))
    for box in [(16, 16, 18, 18), (9, 20, 27, 30)]:  # an unseen strip of the crop tiles, then a wider box
        layout, changed = changed_tokens(model, img, box)
        assert changed == set(layout.positions_in_box(0, box).tolist())
        assert bool(changed & set(layout.crop_grid(0).flatten().tolist())) == (box[0] != 16)
