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
        return image_ablation_hooks(inputs, [inputs.layout.image_positions(b) for b in range(len(batch))], "zero")

    out = compare(raw_model, items, factory, batch_size=2)
    assert calls == [2, 2, 1]
    assert out["baseline"].accuracy - out["intervened"].accuracy == out["accuracy_drop"]
    generated = evaluate(raw_model, items[:2], mode="generate", max_new_tokens=2)
    assert len(generated.predictions) == 2
