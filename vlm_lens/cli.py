"""The `vlm-lens` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-lens", description="Interpretability views of vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write an HTML report (logit lens, attention, ablation, knockout)")
    demo.add_argument("--out", default="vlm_lens_demo", help="report folder (default: ./vlm_lens_demo)")
    demo.add_argument("--model", default=None, help="HF hub id or local folder (default: the shipped organism)")
    demo.add_argument("--image", default=None, help="image file (required with --model)")
    demo.add_argument("--prompt", default=None, help="prompt with an <image> placeholder")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--n-eval", type=int, default=64, help="organism items scored under ablation/knockout")
    args = parser.parse_args(argv)

    from vlm_lens.demo import DemoConfig, run_demo

    try:
        index = run_demo(DemoConfig(out=Path(args.out), model=args.model, image=args.image, prompt=args.prompt,
                                    device=args.device, n_eval=args.n_eval))
    except ValueError as err:
        print(f"vlm-lens demo: {err}", file=sys.stderr)
        return 2
    print(f"Report written to {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
