"""Decode an exported ONNX model (`blockffn export-onnx --with-past`) with ONNX Runtime: the peer engine of our
benchmarks and the reference our ONNX-imported builds are checked against.  numpy and onnxruntime only.

The loop is the plain ONNX Runtime one a user writes: prefill the prompt with an empty past, then one token per
step feeding ``present.*`` back as ``past_key_values.*`` (the graph concatenates; the cache grows by a token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from blockffn.errors import BlockFFNError

_NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass
class GreedyRun:
    tokens: list[int]
    prefill_s: float
    decode_s: float  # the decode steps only (the prefill's first token excluded)
    step_logits: list = field(default_factory=list)  # logits [vocab] of every generated token, if kept

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else float("nan")


class OnnxRuntimeLM:
    """An ONNX causal LM with GenAI/Optimum cache I/O, on ONNX Runtime's CPU provider."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail / InvalidGraph / NoSuchFile classes
            raise BlockFFNError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = {"input_ids", "attention_mask", "position_ids"} - set(inputs)
        if missing:
            raise BlockFFNError(f"{path}: not a causal LM graph of ours (no input {', '.join(sorted(missing))})")
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.with_past = bool(self.past)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int = 1) -> dict:
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), _NUMPY_DTYPES[i.type]) for i in self.past}

    def forward(self, ids: np.ndarray, past_len: int, cache: dict | None) -> tuple[np.ndarray, dict]:
        """Logits [B, T, V] of ``ids`` [B, T] after ``past_len`` cached tokens, and the grown cache."""
        b, t = ids.shape
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, past_len + t), np.int64),
                 "position_ids": np.broadcast_to(np.arange(past_len, past_len + t), (b, t)).astype(np.int64)}
        feeds.update(cache or {})
        out = dict(zip(self.outputs, self.session.run(None, feeds)))
        present = {n.replace("present.", "past_key_values.", 1): v for n, v in out.items() if n.startswith("present.")}
        return out["logits"], present

    def greedy(self, prompt: list[int], max_tokens: int, keep_logits: bool = False) -> GreedyRun:
        """``max_tokens`` greedy tokens after ``prompt``; without a cache each step rescores the whole sequence."""
        if not prompt or max_tokens < 1:
            raise BlockFFNError("greedy decoding needs a non-empty prompt and max_tokens >= 1")
        ids = np.asarray([prompt], np.int64)
        t0 = time.perf_counter()
        logits, cache = self.forward(ids, 0, self.empty_cache() if self.with_past else None)
        prefill_s = time.perf_counter() - t0
        tokens, kept = [int(logits[0, -1].argmax())], [logits[0, -1]] if keep_logits else []
        t0 = time.perf_counter()
        while len(tokens) < max_tokens:
            if self.with_past:
                logits, cache = self.forward(np.asarray([[tokens[-1]]]), len(prompt) + len(tokens) - 1, cache)
            else:
                logits, _ = self.forward(np.asarray([prompt + tokens]), 0, None)
            tokens.append(int(logits[0, -1].argmax()))
            if keep_logits:
                kept.append(logits[0, -1])
        return GreedyRun(tokens, prefill_s, time.perf_counter() - t0, kept)
