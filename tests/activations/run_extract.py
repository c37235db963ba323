"""One extraction in a process of its own (``python run_extract.py OUT [--size N]``): the torchrun test
launches it under ``torch.distributed.run``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import extract_args  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--size", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from vlm_lens import activations, organism

    activations.extract(organism.load(), **extract_args(args.out, args.size))


if __name__ == "__main__":
    main()
