"""prepare(), VLMInputs and the image layout."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lens import VLMInputs

PROMPT = "USER : <image>\nwhat is this ? ASSISTANT :"


def img(seed, size=20):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8))


def hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(input_ids=inputs.tokens, pixel_values=inputs.pixel_values,
                  attention_mask=inputs.attention_mask).logits


def test_prepare_one_image_matches_hf(raw_model, hf_llava):
    inputs = raw_model.prepare(PROMPT, images=[img(0)])
    assert isinstance(inputs, VLMInputs)
    assert int(inputs.image_mask.sum()) == raw_model.vlm_cfg.n_image_tokens
    with torch.no_grad():
        ours = raw_model(inputs)
    assert (ours - hf_logits(hf_llava, inputs)).abs().max() <= 1e-4
    assert "images=1" in repr(inputs)


def test_prepare_two_images_in_one_prompt(raw_model, hf_llava):
    prompt = "USER : <image> <image>\nwhat is this ? ASSISTANT :"
    inputs = raw_model.prepare(prompt, images=[img(0), img(1)])
    assert inputs.layout.n_images == 2 and inputs.pixel_values.shape[0] == 2
    g0, g1 = inputs.layout.grid(0), inputs.layout.grid(1)
    assert g0.shape == g1.shape == (4, 4) and g1.min() > g0.max()
    with torch.no_grad():
        assert (raw_model(inputs) - hf_logits(hf_llava, inputs)).abs().max() <= 1e-4


def test_prompt_without_placeholder_puts_image_first(raw_model):
    inputs = raw_model.prepare("what is this ?", images=img(0))
    positions = inputs.layout.image_positions()
    assert int(positions.min()) <= 1  # right after BOS
    assert len(positions) == raw_model.vlm_cfg.n_image_tokens


def test_batch_of_three_padded_equals_unpadded(raw_model, hf_llava):
    prompts = [PROMPT, "USER : <image>\ndescribe the image please ASSISTANT :", "what ?"]
    images = [[img(0)], [img(1)], []]
    batch = raw_model.prepare(prompts, images=images)
    assert batch.tokens.shape[0] == 3 and batch.needs_attention_mask
    with torch.no_grad():
        batched = raw_model(batch)
        for i, (p, ims) in enumerate(zip(prompts, images)):
            single = raw_model.prepare(p, images=ims or None)
            alone = raw_model(single)
            n = single.tokens.shape[1]
            assert (batched[i, -n:] - alone[0]).abs().max() <= 1e-4  # left padding: real tokens at the end
    # against HF with the same processor outputs (HF needs explicit positions for left padding)
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf_llava(input_ids=batch.tokens, pixel_values=batch.pixel_values,
                       attention_mask=batch.attention_mask, position_ids=position_ids).logits
    real = batch.attention_mask.bool()
    assert (batched[real] - ref[real]).abs().max() <= 1e-4


def test_chat_template(raw_model):
    inputs = raw_model.prepare("what is this ?", images=[img(0)], chat=True)
    text = raw_model.tokenizer.decode(inputs.tokens[0][~inputs.image_mask[0]])
    assert "USER" in text and "ASSISTANT" in text


def test_to_str_tokens_labels_grid_cells(raw_model):
    inputs = raw_model.prepare(PROMPT, images=[img(0)])
    labels = raw_model.to_str_tokens(inputs)
    grid = inputs.layout.grid(0)
    assert labels[int(grid[0, 0])] == "<img0 r0 c0>"
    assert labels[int(grid[3, 2])] == "<img0 r3 c2>"
    assert "what" in labels


def test_layout_helpers_roundtrip(raw_model):
    inputs = raw_model.prepare(PROMPT, images=[img(0)])
    layout = inputs.layout
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = True
    positions = layout.mask_to_positions(0, mask)
    assert positions.tolist() == [layout.position(0, 1, 2), layout.position(0, 3, 0)]
    assert torch.equal(layout.positions_to_mask(0, positions), mask)
    assert layout.cell_of(layout.position(0, 2, 1)) == (0, 2, 1)
    with pytest.raises(ValueError, match="grid"):
        layout.mask_to_positions(0, torch.zeros(3, 3, dtype=torch.bool))


def test_to_device_and_shape(raw_model):
    inputs = raw_model.prepare(PROMPT, images=[img(0)]).to("cpu")
    assert inputs.shape == inputs.tokens.shape and len(inputs) == 1


def test_layout_grid_maps_to_the_right_patch(raw_model):
    """Change one image patch's pixels: only that patch's position changes at hook_image_embeds."""
    inputs = raw_model.prepare(PROMPT, images=[img(0)])
    pixels = inputs.pixel_values.clone()
    p = raw_model.vlm_cfg.vision.patch_size
    r, c = 2, 1
    pixels[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += 1.0
    # the vision tower mixes patches, so look at the patch embedding (before attention) mapped through the layout
    with torch.no_grad():
        _, clean = raw_model.run_with_cache(inputs, names_filter="vision.hook_patch_embed")
        _, moved = raw_model.run_with_cache(inputs.tokens, pixel_values=pixels, names_filter="vision.hook_patch_embed")
    changed = (clean["vision.hook_patch_embed"] - moved["vision.hook_patch_embed"]).abs().amax(-1)[0] > 1e-6
    # patch k of the tower is image token k of the layout (default strategy drops only CLS)
    grid_index = torch.arange(16).reshape(4, 4)
    assert changed.nonzero().flatten().tolist() == [int(grid_index[r, c])]
    # and the layout sends that cell to the sequence position whose embedding is that image token
    with torch.no_grad():
        _, c1 = raw_model.run_with_cache(inputs, names_filter=["hook_image_embeds", "hook_embed"])
    pos = inputs.layout.position(0, r, c)
    assert torch.equal(c1["hook_embed"][0, pos], c1["hook_image_embeds"][0, int(grid_index[r, c])])


BAD_PREPARE = {
    "more placeholders than images": (dict(prompts="USER : <image> <image>\n?", images=[img(0)]), "placeholder"),
    "fewer placeholders than images": (dict(prompts=PROMPT, images=[img(0), img(1)]), "placeholder"),
    "two channels": (dict(prompts=PROMPT, images=[np.zeros((8, 8, 2), dtype=np.uint8)]), "channels"),
    "empty image": (dict(prompts=PROMPT, images=[Image.new("RGB", (0, 0))]), "empty"),
    "not an image": (dict(prompts=PROMPT, images=["cat.png"]), "not an image"),
    "too long": (dict(prompts=PROMPT + " what" * 300, images=[img(0)]), "context"),
}


@pytest.mark.parametrize("case", list(BAD_PREPARE))
def test_bad_prepare_inputs(raw_model, case):
    kwargs, words = BAD_PREPARE[case]
    with pytest.raises(ValueError, match=words):
        raw_model.prepare(kwargs["prompts"], images=kwargs["images"])
    assert all(not hp._forward_hooks for hp in raw_model.hook_dict.values())


def test_split_image_tokens_hands_out_consecutive_images_and_names_what_is_wrong():
    from vlm_lens.layout import split_image_tokens

    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = list(split_image_tokens(mask, [3, 2, 2], "image_sizes", str))
    assert [(b, k, c.tolist()) for b, k, c in out] == [(0, 0, [1, 2, 3]), (0, 1, [5, 6]), (1, 2, [0, 1])]
    with pytest.raises(ValueError, match="more image tokens than the 2 image"):
        list(split_image_tokens(mask, [3, 2], "image_sizes", str))
    with pytest.raises(ValueError, match=r"image 0 \(0\) takes 4 consecutive"):
        list(split_image_tokens(mask, [4, 1, 2], "image_sizes", str))
    with pytest.raises(ValueError, match="image_grid_thw describes 4 images but the tokens hold 3"):
        list(split_image_tokens(mask, [3, 2, 2, 1], "image_grid_thw", str))


def test_cell_of_looks_in_the_given_row_only(raw_model):
    """Row 0 text only, row 1 with an image: a row-0 position is no image cell, whatever row 1 has there."""
    inputs = raw_model.prepare(["what is this ?", PROMPT], images=[[], [img(0)]])
    position = inputs.layout.position(0, 1, 1)
    assert inputs.layout.batch_of(0) == 1
    assert inputs.layout.cell_of(position) is None
    assert inputs.layout.cell_of(position, batch=1) == (0, 1, 1)


def test_string_input_honours_prepend_bos_and_padding_side(raw_model):
    """TransformerLens's tokenisation arguments reach the tokeniser when HookedVLM tokenises a string."""
    with torch.no_grad():
        tokens = raw_model.to_tokens("what is this ?", prepend_bos=False)
        assert torch.equal(raw_model("what is this ?", prepend_bos=False), raw_model(tokens))
        _, cache = raw_model.run_with_cache("what is this ?", prepend_bos=False, names_filter="hook_embed")
        assert cache["hook_embed"].shape[1] == tokens.shape[1]
        texts = ["what is this ?", "a"]
        for side in ("left", "right"):
            padded = raw_model.to_tokens(texts, padding_side=side)
            mask = (padded != raw_model.tokenizer.pad_token_id).long()
            mask[:, 0] = 1  # BOS
            out = raw_model(texts, padding_side=side)
            short = int(mask[1].sum())
            last = -1 if side == "left" else short - 1
            alone = raw_model("a")[0, -1]
            assert torch.allclose(out[1, last], alone, atol=1e-4), side
