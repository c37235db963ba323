"""The shapes data generator: determinism, held-out split, one-token answers, patch-mask ground truth."""

import hashlib

import numpy as np
import pytest
import torch

from vlm_lens.organism import ShapesDataset, build, data, prompt_for


def _fingerprint(item) -> tuple:
    return (item.image.tobytes(), item.prompt, item.answer, item.question_type, item.target_mask.tobytes())


def _image_hash(item) -> str:
    return hashlib.sha256(item.image.tobytes()).hexdigest()


def test_same_seed_same_items():
    a = [_fingerprint(it) for it in ShapesDataset(split="test", seed=3, size=40)]
    b = [_fingerprint(it) for it in ShapesDataset(split="test", seed=3, size=40)]
    assert a == b


def test_different_seeds_differ():
    a = {_image_hash(it) for it in ShapesDataset(split="test", seed=0, size=40)}
    b = {_image_hash(it) for it in ShapesDataset(split="test", seed=1, size=40)}
    assert len(a & b) == 0


def test_train_and_test_share_no_image():
    train = {_image_hash(it) for it in ShapesDataset(split="train", seed=0, size=1500)}
    for seed in (0, 1):
        test = {_image_hash(it) for it in ShapesDataset(split="test", seed=seed, size=300)}
        assert not train & test


def test_each_question_type_and_answer_is_valid():
    items = list(ShapesDataset(split="train", seed=0, size=200))
    assert {it.question_type for it in items} == set(data.QUESTION_TYPES)
    for it in items:
        assert it.answer in data.ANSWERS
        assert it.prompt == prompt_for(it.question)
        assert it.image.mode == "RGB" and it.image.size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
        assert 1 <= len(it.objects) <= 3
        assert len({o.shape for o in it.objects}) == len({o.colour for o in it.objects}) == len(it.objects)


def test_answers_and_question_words_are_single_known_tokens():
    tok = build.build_tokenizer()
    for answer in data.ANSWERS:
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, answer
    for it in ShapesDataset(split="test", seed=0, size=100):
        assert tok.unk_token_id not in tok(it.prompt)["input_ids"], it.prompt


def test_image_placeholder_is_one_token_before_a_newline():
    tok = build.build_tokenizer()
    ids = tok("USER: <image>\nwhat colour is the circle ? ASSISTANT:")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1


def test_chat_template_gives_the_training_prompt():
    processor = build.build_processor()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle ?"}],
        }
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == prompt_for("what colour is the circle ?")


@pytest.mark.parametrize("n_objects", [1, 3])
def test_masks_match_drawn_pixels(n_objects):
    """pixel_mask is exactly the non-background pixels of its object; a patch is in patch_mask iff its
    PATCH x PATCH block holds at least one pixel of the object (checked cell by cell)."""
    seen = set()
    for it in ShapesDataset(split="train", seed=7, size=120, n_objects=n_objects):
        pixels = np.asarray(it.image)
        drawn = (pixels != np.array(data.BACKGROUND)).any(-1)
        union = np.zeros_like(drawn)
        for obj in it.objects:
            seen.add(obj.shape)
            assert obj.pixel_mask.shape == (data.IMAGE_SIZE, data.IMAGE_SIZE)
            assert obj.patch_mask.shape == (data.GRID, data.GRID)
            assert not (union & obj.pixel_mask).any()  # objects never overlap
            union |= obj.pixel_mask
            for r in range(data.GRID):
                for c in range(data.GRID):
                    block = obj.pixel_mask[
                        r * data.PATCH : (r + 1) * data.PATCH, c * data.PATCH : (c + 1) * data.PATCH
                    ]
                    assert obj.patch_mask[r, c] == bool(block.any())
            colours = pixels[obj.pixel_mask]
            assert (np.abs(colours.astype(int) - data.COLOURS[obj.colour]) <= 15).all()
        np.testing.assert_array_equal(union, drawn)
    assert seen == set(data.SHAPES)


def test_target_mask_is_the_asked_about_object():
    for it in ShapesDataset(split="test", seed=0, size=200):
        if it.answer == "no":
            assert not it.target_mask.any()
            continue
        matches = [o for o in it.objects if np.array_equal(o.patch_mask, it.target_mask)]
        assert len(matches) == 1
        obj = matches[0]
        if it.question_type == "colour_of_shape":
            assert obj.shape in it.question and it.answer == obj.colour
        elif it.question_type == "shape_of_colour":
            assert obj.colour in it.question and it.answer == obj.shape
        elif it.question_type == "position":
            assert it.question.endswith(f"at the {data.position_name(obj.cell)} ?") and it.answer == obj.shape
        else:
            assert it.answer == "yes" and f"{obj.colour} {obj.shape}" in it.question


def test_fast_encoding_matches_the_processor():
    processor = build.build_processor()
    items = list(ShapesDataset(split="test", seed=0, size=12))
    slow, fast = build.encode(processor, items), build.encode_fast(processor, items)
    for key in ("input_ids", "attention_mask", "last", "answer"):
        assert torch.equal(slow[key], fast[key]), key
    torch.testing.assert_close(slow["pixel_values"], fast["pixel_values"], atol=1e-6, rtol=0)
