"""The training chats: the first turn is the evaluation prompt, and only answers (and </s>) are supervised."""

import pytest

from vlm_lens.organism import ShapesDataset, batches, build, train


def test_first_turn_is_the_dataset_prompt():
    data = ShapesDataset(split="train", seed=0, size=6)
    for index in range(6):
        item = data[index]
        _, objects, text, _ = batches.conversation("train", 0, index, turns=4)
        assert text.startswith(f"{item.prompt} {item.answer}</s>USER: ")
        assert [o.patch_mask.tolist() for o in objects] == [o.patch_mask.tolist() for o in item.objects]


def test_pool_labels_are_answers_and_end_of_turn():
    processor = build.build_processor()
    tok = processor.tokenizer
    pool = batches.make_pool(processor, size=3, seed=0, turns=4)
    for row in range(3):
        ids, labels = pool["input_ids"][row], pool["labels"][row]
        supervised = [(int(ids[j]), int(labels[j])) for j in range(len(ids)) if labels[j] != -100]
        assert len(supervised) == 8
        for (prev, answer), (_, eos) in zip(supervised[::2], supervised[1::2]):
            assert tok.convert_ids_to_tokens(prev) == ":" and eos == tok.eos_token_id
            assert tok.convert_ids_to_tokens(answer) in train.data.ANSWERS


def test_oversampled_indices_give_fresh_images_of_the_asked_type():
    from vlm_lens.organism import scenes

    plain = batches.oversampled_indices(640, 10, None, scenes)
    assert plain == list(range(640, 650))
    mixed = batches.oversampled_indices(640, 10, "relative:0.4", scenes)
    assert mixed[4:] == plain[4:] and len(set(mixed)) == 10
    assert [scenes.make_item("train", 0, i).question_type for i in mixed[:4]] == ["relative"] * 4
    following = batches.oversampled_indices(650, 10, "relative:0.4", scenes)
    assert not set(following) & set(mixed)  # the next batch's images are new too
    with pytest.raises(ValueError, match="unknown question type 'size'"):
        batches.oversampled_indices(0, 4, "size:0.5", scenes)


def test_vision_loss_asks_shape_only_of_object_patches():
    import torch

    from vlm_lens.organism import scenes

    torch.manual_seed(0)
    heads = train.PatchHeads(16, scenes)
    with torch.no_grad():  # silence the colour and cell heads: what is left is the shape term
        for head in (heads.colour, heads.cell):
            head.weight.zero_()
    tokens = torch.randn(2, scenes.GRID * scenes.GRID, 16, requires_grad=True)
    labels = build.patch_labels([scenes.make_scene("train", 0, i)[1] for i in range(2)], scenes)
    heads.vision_loss(tokens, labels).backward()
    on_object = labels["shape"] > 0
    assert bool(on_object.any()) and bool((~on_object).any())
    assert tokens.grad[~on_object].abs().max() == 0  # background patches get no shape loss
    assert bool((tokens.grad[on_object].abs().sum(-1) > 0).all())


def test_relation_labels_describe_the_two_objects_and_the_asked_relation():
    from vlm_lens.organism import scenes

    processor = build.build_processor(scenes)
    indices = batches.oversampled_indices(0, 4, "relative:0.5", scenes)
    pool = batches.make_pool(processor, 4, 0, 1, start=0, source=scenes, oversample="relative:0.5")
    for row, index in enumerate(indices):
        _, objects, text, _ = batches.conversation("train", 0, index, 1, scenes)
        cells = pool["relation_cells"][row].tolist()
        comparisons = pool["relation_comparisons"][row].tolist()
        asked = pool["relation_asked"][row].tolist()
        if row < 2:  # relative: "is the <colour> <shape> <relation> the <shape> ?"
            words = text.split("\n")[0].split()
            a = next(o for o in objects if (o.colour, o.shape) == (words[3], words[4]))
            b = next(o for o in objects if o.shape == words[-2])
            assert cells == [a.cell[0] * 3 + a.cell[1], b.cell[0] * 3 + b.cell[1]]
            (ra, ca), (rb, cb) = a.cell, b.cell
            assert comparisons == [ca < cb, ca > cb, ra < rb, ra > rb]
            relation = " ".join(words[5:-3])
            assert asked == [scenes.RELATIONS.index(relation)]
            # the answer the organism must give follows from the comparisons and the asked relation
            assert text.split("ASSISTANT: ")[1].startswith("yes" if comparisons[asked[0]] else "no")
        else:
            assert cells == [-100, -100] and comparisons == [-100] * 4 and asked == [-100]
        end = int(pool["prompt_end"][row])
        tokens = processor.tokenizer.convert_ids_to_tokens(pool["input_ids"][row, end - 1 : end + 1].tolist())
        assert tokens == ["assistant", ":"]


@pytest.mark.parametrize("target,shape", [("cells", (2, 9)), ("comparisons", (4, 2)), ("asked", (1, 4))])
def test_relation_head_has_one_output_per_label_and_class(target, shape):
    from vlm_lens.organism import scenes

    heads = train.PatchHeads(16, scenes, relation=target)
    assert heads.relation_shape == shape
    assert heads.relation.out_features == shape[0] * shape[1]


def test_relation_layer_out_of_range_is_refused(capsys):
    argv = ["--organism", "scenes", "--out", "unused", "--relation-weight", "1", "--relation-layer"]
    assert train.parse_args(argv + ["7"]).relation_layer == 7
    assert train.parse_args(argv[:-1]).relation_layer == 3  # the middle of 8 layers
    with pytest.raises(SystemExit):
        train.parse_args(argv + ["8"])
    assert "--relation-layer 8: the language model has layers 0..7" in capsys.readouterr().err
