"""What the framework scripts (lightning_fit.py, hf_train.py) share: their common arguments and
how they write what a run left."""

import argparse
import pathlib

import torch


def arguments() -> argparse.ArgumentParser:
    """OUT, --kill-after STEP (die with os._exit(17) right after that step's checkpoint), --resume
    CKPT, --workers N, --replay MANIFEST; the script adds its own."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--replay")
    return parser


def weights_bytes(model: torch.nn.Module) -> bytes:
    """The state dict's raw bytes, in order."""
    return b"".join(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in model.state_dict().values())
