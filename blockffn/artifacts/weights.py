"""Model weights as an MLC tensor cache (``tensor-cache.json`` + ``params_shard_*.bin``).

Written with ``tvm.contrib.tvmjs.dump_tensor_cache`` in ``raw`` format for every tensor: MLC's default
``f32-to-bf16`` would silently round fp32 weights (router weights included) to bf16.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from blockffn.artifacts.layout import LEGACY_TENSOR_CACHE, TENSOR_CACHE


def to_numpy(t, dtype: str) -> np.ndarray:
    """A torch tensor as a numpy array of ``dtype`` (compile side; the runtime never imports PyTorch)."""
    import torch

    if dtype == "bfloat16":
        import ml_dtypes

        bits = t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return bits.view(ml_dtypes.bfloat16)
    return t.detach().to(getattr(torch, dtype)).contiguous().numpy()


def write_tensor_cache(tensors, out_dir: Path, shard_cap_mb: int = 32, metadata: dict | None = None) -> dict:
    """``tensors``: a dict or an iterator of ``(name, array)``; tvmjs writes each shard as it fills, so an iterator
    is never held in memory as a whole."""
    import contextlib
    import io

    from tvm.contrib import tvmjs

    with contextlib.redirect_stdout(io.StringIO()):  # tvmjs prints progress lines unconditionally
        tvmjs.dump_tensor_cache(tensors, str(out_dir), encode_format="raw", shard_cap_mb=shard_cap_mb,
                                show_progress=False, meta_data=metadata)
    shutil.copyfile(out_dir / TENSOR_CACHE, out_dir / LEGACY_TENSOR_CACHE)
    return json.loads((out_dir / TENSOR_CACHE).read_text())


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def param_records(cache: dict) -> list[dict]:
    return [rec for shard in cache["records"] for rec in shard["records"]]
