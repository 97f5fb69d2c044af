"""Where a training process runs: its device (one GPU per torchrun rank), its autocast, moving batches there.

Batches are cut on the CPU (numpy windows over the packed split) and moved per step; at the sizes we train, the copy
is small next to the step.  bf16 autocast is what makes a GPU step fast; on the 2-core CI CPU it was measured slower
than fp32, so it stays a choice there.
"""

from __future__ import annotations

import contextlib
import os

import torch

from blockffn.errors import BlockFFNError

DEVICES = ("auto", "cpu", "cuda")


def training_device(name: str = "auto") -> torch.device:
    """``auto`` is the GPU when torch sees one.  Under torchrun each rank takes GPU ``LOCAL_RANK``."""
    if name not in DEVICES:
        raise BlockFFNError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BlockFFNError("--device cuda: this torch sees no CUDA GPU (a CPU-only build, or no driver); "
                            "use --device cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise BlockFFNError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def autocast(device: torch.device, mode: str):
    """bf16 autocast on ``device`` when ``mode`` is ``bf16`` (or ``auto`` on a GPU), else a no-op context."""
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
