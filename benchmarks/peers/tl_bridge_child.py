"""TransformerLens 4's ``TransformerBridge`` on the benchmark model, run in TransformerLens 4's own environment.

TransformerLens 4 and 3.9 (vlm_lens's) cannot share an environment, so ``tl_bridge.py`` runs this script
with the Python of a second one (see benchmarks/README.md)::

    /work/venvs/tl4/bin/python benchmarks/peers/tl_bridge_child.py --folder MODEL --inputs inputs.pt \\
        --out result.json --rounds 11 --new-tokens 32

It loads the same checkpoint folder with ``TransformerBridge.boot_transformers`` and HF's
``LlavaForConditionalGeneration`` twice (eager, sdpa), times both with ``peers.common.measure``
(the method of the main run), and writes ``result.json`` (figures) and ``result.pt`` (logits and new
tokens, which the parent compares with its own HF reference). Only torch, transformers and
transformer_lens are imported here, never vlm_lens.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_cases  # noqa: E402

from peers.common import Calls, hook_edits, measure, projector_layer, uniform, zeros  # noqa: E402


def boot(folder: Path, dtype: torch.dtype, device: str):
    """``TransformerBridge.boot_transformers`` on a local folder, never installing anything.

    When a multimodal processor fails to load, TransformerLens 4.3 pip-installs torchvision into its
    environment and retries; that install upgrades torch (to a CUDA build) under the benchmark. Refuse it
    here (the README's environment has pillow, so the processor loads without it)."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # other TransformerLens 4 layouts: nothing to refuse
        helpers = None
    if helpers is not None and hasattr(helpers, "_ensure_torchvision"):
        helpers._ensure_torchvision = lambda: False
    return TransformerBridge.boot_transformers(str(folder), device=device, dtype=dtype)


def calls(bridge, tokens: torch.Tensor, pixels: torch.Tensor, layer: int, n_new: int) -> Calls:
    """The bridge's own API: hook names of its LLaVA adapter (``vision_encoder.encoder_layers.{l}``)."""
    run_with_hooks = functools.partial(bridge.run_with_hooks, tokens, pixel_values=pixels)
    noop = [
        (f"blocks.{block}.hook_resid_post", lambda value, hook: None) for block in range(bridge.cfg.n_layers)
    ]
    vision = f"vision_encoder.encoder_layers.{layer}"
    return Calls(
        forward=lambda: bridge(tokens, pixel_values=pixels),
        cache_resid=lambda: bridge.run_with_cache(
            tokens, pixel_values=pixels, names_filter=lambda name: name.endswith("hook_resid_post")
        ),
        noop_hook=lambda: run_with_hooks(fwd_hooks=noop),
        cache_all=lambda: bridge.run_with_cache(tokens, pixel_values=pixels)[1],
        generate=lambda: bridge.generate(
            tokens,
            pixel_values=pixels,
            max_new_tokens=n_new,
            stop_at_eos=False,
            do_sample=False,
            return_type="tokens",
            verbose=False,
        )[:, tokens.shape[1] :],
        edit_output=hook_edits(run_with_hooks, f"{vision}.hook_resid_post", zeros),
        edit_pattern=hook_edits(run_with_hooks, f"{vision}.attn.hook_pattern", uniform),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, required=True, help="the benchmark's model folder")
    p.add_argument("--inputs", type=Path, required=True, help=".pt file with 'tokens' and 'pixels'")
    p.add_argument("--out", type=Path, required=True, help="result .json (the tensors go next to it as .pt)")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    inputs = torch.load(args.inputs)
    tokens, pixels = inputs["tokens"].to(args.device), inputs["pixels"].to(args.device)
    start = time.perf_counter()
    bridge = boot(args.folder, dtype, args.device)
    load_s = time.perf_counter() - start
    hf = hf_cases.load_hf(args.folder, dtype, args.device)
    layer = projector_layer(hf["sdpa"].config)
    figures, logits, new_tokens = measure(
        "tl-bridge",
        calls(bridge, tokens, pixels, layer, args.new_tokens),
        hf,
        tokens,
        pixels,
        args.new_tokens,
        args.rounds,
        args.device,
    )
    figures.update(
        load_s=load_s,
        torch_threads=torch.get_num_threads(),
        versions={name: version(name) for name in ("transformer-lens", "transformers", "torch")},
    )
    torch.save({"logits": logits.cpu(), "new_tokens": new_tokens.cpu()}, args.out.with_suffix(".pt"))
    args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
