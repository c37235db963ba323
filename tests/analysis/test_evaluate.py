from dataclasses import dataclass

import torch
from PIL import Image

from vlm_lens.analysis import compare, evaluate, image_ablation_hooks

from .conftest import PROMPT, make_image


@dataclass
class Item:
    image: Image.Image
    prompt: str
    answer: str
    question_type: str


def test_evaluate_and_compare(raw_model):
    items = [Item(make_image(i), PROMPT, "cat" if i % 2 else "dog", "a" if i < 3 else "b") for i in range(5)]
    # make the answers what the model predicts for the first three items
    with torch.no_grad():
        for i in range(3):
            inputs = raw_model.prepare(items[i].prompt, images=[items[i].image])
            items[i].answer = raw_model.tokenizer.decode([int(raw_model(inputs)[0, -1].argmax())]).strip()
    result = evaluate(raw_model, items, batch_size=2)
    assert result.correct[:3].all()
    assert result.by_type["a"] == 1.0 and 0 <= result.accuracy <= 1
    calls = []

    def factory(inputs, batch):
        calls.append(len(batch))
        return image_ablation_hooks(
            inputs, [inputs.layout.image_positions(b) for b in range(len(batch))], "zero"
        )

    out = compare(raw_model, items, factory, batch_size=2)
    assert calls == [2, 2, 1]
    assert out["baseline"].accuracy - out["intervened"].accuracy == out["accuracy_drop"]
    generated = evaluate(raw_model, items[:2], mode="generate", max_new_tokens=2)
    assert len(generated.predictions) == 2


def test_answers_of_several_tokens_are_scored_on_every_token():
    """Teacher forcing: "blue </s>" is right when the model says blue then ends; "blue circle" is wrong
    although its first token is right; probabilities are the product over the answer's tokens."""
    from vlm_lens import organism
    from vlm_lens.analysis import answer_positions, answer_tokens

    model = organism.load()
    item = next(
        it
        for it in organism.ShapesDataset(split="test", seed=0, size=20)
        if it.question_type == "colour_of_shape"
    )
    other = next(c for c in ("red", "green", "blue") if c != item.answer)
    items = [
        Item(item.image, item.prompt, a, "x")
        for a in (item.answer, f"{item.answer} </s>", f"{item.answer} circle", f"{other} </s>")
    ]
    result = evaluate(model, items, batch_size=4)
    assert result.correct.tolist() == [True, True, False, False]
    assert result.predictions[1] == result.predictions[2]  # the same greedy answer under teacher forcing

    inputs = model.prepare([f"{it.prompt} {it.answer}" for it in items], images=[[item.image]] * 4)
    where = answer_positions(model, inputs, items)
    end = inputs.tokens.shape[1] - 1
    assert [w.tolist() for w in where] == [
        [end - 1],
        [end - 2, end - 1],
        [end - 2, end - 1],
        [end - 2, end - 1],
    ]
    assert [
        w.tolist()
        for w in answer_positions(model, model.prepare(item.prompt, images=[item.image]), items[1:2])
    ] == [[model.prepare(item.prompt, images=[item.image]).tokens.shape[1] - 1]]
    with torch.no_grad():
        probs = model(inputs).float().softmax(-1)
    for b, it in enumerate(items):
        ids = answer_tokens(model.tokenizer, it.answer)
        expected = torch.stack([probs[b, p, t] for p, t in zip(where[b].tolist(), ids)]).prod()
        torch.testing.assert_close(result.answer_probs[b], expected, atol=1e-5, rtol=1e-4)
    generated = evaluate(model, items[:3], mode="generate", max_new_tokens=2)
    assert generated.correct.tolist() == [True, True, False]  # generation writes "blue </s>"


class _SpaceMarkingTokenizer:
    """Word-level, but a text that starts with a space gets a space token first (as SentencePiece does)."""

    vocab = {"▁": 0, "Q:": 1, "red": 2, "circle": 3}

    def encode(self, text, add_special_tokens=False):
        return [0] * text.startswith(" ") + [self.vocab[w] for w in text.split()]


def test_answer_tokens_are_read_after_the_prompt():
    from vlm_lens.analysis import answer_tokens

    tok = _SpaceMarkingTokenizer()
    assert answer_tokens(tok, "red circle") == [0, 2, 3]  # alone: the space is a token of its own
    assert answer_tokens(tok, "red circle", prompt="Q:") == [2, 3]  # after the prompt it is not
