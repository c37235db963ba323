"""nnsight on the benchmark model: ``TransformersModel`` wraps the HF ``LlavaForConditionalGeneration``
loaded from the same folder (with HF's default attention, as a user gets it), and every call goes through
nnsight's tracing (``model.trace`` / ``model.generate``).

- residual stream: ``.output.save()`` of each vision encoder layer and each language-model layer;
- one no-op per layer: each language-model layer's ``.output`` read and left unchanged;
- everything: ``tracer.cache()`` (every module's output; nnsight has no attention-pattern entries);
- the vision edits: ``.output`` of the layer the projector reads, and, for the pattern, the softmax inside
  HF's eager attention function reached through ``.source`` (so the edits run with eager attention).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import hf_cases
import torch

from peers.common import Calls, uniform, zeros


def load(folder: Path, dtype: torch.dtype, device: str):
    from nnsight import TransformersModel

    return TransformersModel(
        str(folder), task="image-text-to-text", dispatch=True, dtype=dtype, device_map=device
    )


def version() -> str:
    from importlib.metadata import version as package_version

    return package_version("nnsight")


@contextlib.contextmanager
def eager_attention(model):
    """The pattern exists as a tensor only in HF's eager attention; switch to it and back."""
    hf = model._module
    before = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf.set_attn_implementation(before)


def calls(model, tokens: torch.Tensor, pixels: torch.Tensor, layer: int, n_new: int) -> Calls:
    import nnsight

    inputs = {"input_ids": tokens, "pixel_values": pixels}
    tower = model.model.vision_tower
    vision_layers = getattr(tower, "vision_model", tower).encoder.layers
    lm_layers = model.model.language_model.layers
    target = vision_layers[layer]

    def forward():
        with model.trace(**inputs):
            logits = model.output.logits.save()
        return logits

    def cache_resid():
        with model.trace(**inputs):
            outputs = nnsight.save([])
            for block in [*vision_layers, *lm_layers]:
                outputs.append(block.output.save())
        return outputs

    def noop_hook():
        with model.trace(**inputs):
            for block in lm_layers:
                _ = block.output

    def cache_all():
        with model.trace(**inputs) as tracer:
            cache = tracer.cache()
        return cache

    def generate():
        with model.generate(
            **inputs,
            attention_mask=torch.ones_like(tokens),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=hf_cases.PAD_TOKEN_ID,
        ) as tracer:
            ids = tracer.result.save()
        return ids[:, tokens.shape[1] :]

    def output_replace():
        with model.trace(**inputs):
            target.output = zeros(target.output)
            logits = model.output.logits.save()
        return logits

    def output_in_place():
        with model.trace(**inputs):
            target.output[...] = zeros(target.output)
            logits = model.output.logits.save()
        return logits

    def pattern_replace():
        with model.trace(**inputs):
            softmax = target.self_attn.source.attention_interface_1.source.nn_functional_softmax_0
            softmax.output = uniform(softmax.output)
            logits = model.output.logits.save()
        return logits

    def pattern_in_place():
        with model.trace(**inputs):
            softmax = target.self_attn.source.attention_interface_1.source.nn_functional_softmax_0
            softmax.output[...] = uniform(softmax.output)
            logits = model.output.logits.save()
        return logits

    return Calls(
        forward=forward,
        cache_resid=cache_resid,
        noop_hook=noop_hook,
        cache_all=cache_all,
        generate=generate,
        edit_output={"replace": output_replace, "in place": output_in_place},
        edit_pattern={"replace": pattern_replace, "in place": pattern_in_place},
        edit_mode=lambda: eager_attention(model),
    )
