"""`blockffn gen-config`: ``mlc-chat-config.json`` (with its conversation template) and the tokenizer files of an
artifact, from the model's ``config.json`` alone (MLC's ``gen_config`` step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from blockffn.artifacts import layout
from blockffn.model.checkpoint import TOKENIZER_FILES
from blockffn.model.config import BlockFFNConfig


def write_chat_config(cfg: BlockFFNConfig, quantization: str, context: int, prefill_chunk: int, max_batch_size: int,
                      out_dir: Path, tokenizer_dir: Path | None = None) -> dict:
    """Write ``mlc-chat-config.json`` into ``out_dir`` (copying tokenizer files from ``tokenizer_dir`` first, so the
    config lists what the folder holds); returns the document."""
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (tokenizer_dir / f).exists():
                shutil.copyfile(tokenizer_dir / f, out_dir / f)
    files = [f for f in TOKENIZER_FILES if (out_dir / f).exists()]
    chat = layout.chat_config(cfg, quantization, context, prefill_chunk, max_batch_size, files)
    (out_dir / layout.CHAT_CONFIG).write_text(json.dumps(chat, indent=2) + "\n")
    return chat


def gen_config(model_dir: Path, quantization: str, output: Path, context_window: int | None = None,
               prefill_chunk: int | None = None, max_batch_size: int = 8, overwrite: bool = False) -> dict:
    """`blockffn gen-config`: ``mlc-chat-config.json`` + tokenizer files into ``output`` (which may already hold
    weights or libraries)."""
    from blockffn.compiler.resources import PhaseTimer
    from blockffn.errors import BlockFFNError
    from blockffn.outputs import files_into_dir

    layout.storage_dtype(quantization)
    timer = PhaseTimer()
    cfg = BlockFFNConfig.load(Path(model_dir) / "config.json")
    context = context_window or cfg.max_position_embeddings
    if not 0 < context <= cfg.max_position_embeddings:
        raise BlockFFNError(f"--context-window must be in 1..{cfg.max_position_embeddings}, got {context}")
    chunk = prefill_chunk or min(context, 512)
    if not 0 < chunk <= context:
        raise BlockFFNError(f"--prefill-chunk must be in 1..{context}, got {chunk}")
    if max_batch_size <= 0:
        raise BlockFFNError("--max-batch-size must be positive")
    with files_into_dir(output, overwrite, owned=(layout.CHAT_CONFIG,)) as tmp:
        with timer("gen-config"):
            chat = write_chat_config(cfg, quantization, context, chunk, max_batch_size, tmp, Path(model_dir))
    return {"output": str(output), "config": chat, "seconds": timer.times, "peak_rss_mb": timer.peak_rss_mb}
