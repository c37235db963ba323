"""The training chats: the first turn is the evaluation prompt, and only answers (and </s>) are supervised."""

from vlm_lens.organism import ShapesDataset, build, train


def test_first_turn_is_the_dataset_prompt():
    data = ShapesDataset(split="train", seed=0, size=6)
    for index in range(6):
        item = data[index]
        _, objects, text, _ = train.conversation("train", 0, index, turns=4)
        assert text.startswith(f"{item.prompt} {item.answer}</s>USER: ")
        assert [o.patch_mask.tolist() for o in objects] == [o.patch_mask.tolist() for o in item.objects]


def test_pool_labels_are_answers_and_end_of_turn():
    processor = build.build_processor()
    tok = processor.tokenizer
    pool = train.make_pool(processor, size=3, seed=0, turns=4)
    for row in range(3):
        ids, labels = pool["input_ids"][row], pool["labels"][row]
        supervised = [(int(ids[j]), int(labels[j])) for j in range(len(ids)) if labels[j] != -100]
        assert len(supervised) == 8
        for (prev, answer), (_, eos) in zip(supervised[::2], supervised[1::2]):
            assert tok.convert_ids_to_tokens(prev) == ":" and eos == tok.eos_token_id
            assert tok.convert_ids_to_tokens(answer) in train.data.ANSWERS
