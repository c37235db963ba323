"""The `vlm-lens` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm-lens", description="Interpretability views of vision-language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write an HTML report (logit lens, attention, ablation, knockout)")
    demo.add_argument("--out", default="vlm_lens_demo", help="report folder (default: ./vlm_lens_demo)")
    demo.add_argument(
        "--organism",
        default=None,
        help="model organism whose held-out items and ground truth the report uses (default: the richest "
        "shipped one, scenes when its weights ship, else shapes; none with --model)",
    )
    demo.add_argument(
        "--model", default=None, help="HF hub id or local folder (default: the organism's shipped weights)"
    )
    demo.add_argument(
        "--image", default=None, help="image file (required with --model unless --organism is given)"
    )
    demo.add_argument("--prompt", default=None, help="prompt with an <image> placeholder")
    demo.add_argument("--device", default="cpu")
    demo.add_argument(
        "--n-eval", type=int, default=42, help="held-out organism items the seed studies run on"
    )
    demo.add_argument("--window", type=int, default=3, help="layers per attention-knockout window")
    args = parser.parse_args(argv)

    from vlm_lens.demo import DemoConfig, run_demo

    try:
        options = {k: v for k, v in vars(args).items() if k not in ("command", "out")}  # DemoConfig's fields
        index = run_demo(DemoConfig(out=Path(args.out), **options))
    except (ValueError, FileNotFoundError) as err:
        print(f"vlm-lens demo: {err}", file=sys.stderr)
        return 2
    print(f"Report written to {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
