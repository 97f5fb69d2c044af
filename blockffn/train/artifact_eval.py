"""Evaluate a compiled artifact: perplexity through the TVM library, sparsity metrics through its weights.

Perplexity runs the artifact itself: each window is scored with ``batch_verify`` over a chain (every token's
parent is the previous one), which returns the logits of every position — the same kernels decode and
speculative verification use (sparse under ``--ffn auto``).  Windows are plain causal prefixes (the runtime has no
document masks), so `torch_window_nll` scores the PyTorch model the same way for comparisons.

The router metrics (TLS, CLS_s) need router logits, which the library does not export; `model_from_artifact`
rebuilds the PyTorch model from the artifact's own tensors (q4 weights dequantized bit-exactly as the kernels do),
so they are measured through the artifact's quantized weights and full-precision router.
"""

from __future__ import annotations

import math

import numpy as np

from blockffn.errors import BlockFFNError


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    return float((lse - z[np.arange(len(targets)), targets]).sum())


def artifact_window_nll(engine, tokens, seq_len: int, max_tokens: int | None = None) -> dict:
    """Summed next-token NLL over consecutive windows of ``seq_len + 1`` tokens, through ``engine``."""
    if seq_len > engine.context_window:
        raise BlockFFNError(f"--seq-len {seq_len} exceeds the artifact's context window {engine.context_window}")
    tokens = np.asarray(tokens)
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    if n_windows <= 0:
        raise BlockFFNError(f"evaluation text has {len(tokens)} tokens; need more than --seq-len {seq_len}")
    nll, count, chunk = 0.0, 0, engine.prefill_chunk
    for w in range(n_windows):
        window = tokens[w * seq_len: (w + 1) * seq_len + 1]
        engine.add_sequence(0)
        try:
            for i in range(0, seq_len, chunk):
                piece = [int(t) for t in window[i: min(i + chunk, seq_len)]]
                logits = engine.batch_verify(0, piece, list(range(-1, len(piece) - 1)))
                engine.commit_tree(0, len(piece) - 1)
                nll += _log_softmax_nll(logits, window[i + 1: i + 1 + len(piece)])
                count += len(piece)
        finally:
            engine.reset()
    return {"loss": nll / count, "ppl": math.exp(min(nll / count, 50.0)), "tokens": count}


def torch_window_nll(model, tokens, seq_len: int, max_tokens: int | None = None) -> dict:
    """`artifact_window_nll` for a PyTorch model (same windows, plain causal attention)."""
    import torch

    tokens = np.asarray(tokens)
    n_windows = (len(tokens) - 1) // seq_len
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            window = tokens[w * seq_len: (w + 1) * seq_len + 1].astype(np.int64)
            logits = model(torch.from_numpy(window[None, :-1])).logits[0].float().numpy()
            nll += _log_softmax_nll(logits, window[1:])
            count += seq_len
    return {"loss": nll / count, "ppl": math.exp(min(nll / count, 50.0)), "tokens": count}


def read_tensor_cache(art) -> dict[str, np.ndarray]:
    """Every tensor of an artifact's raw tensor cache as numpy (views of the shard bytes)."""
    out = {}
    for shard in art.tensor_cache["records"]:
        raw = (art.path / shard["dataPath"]).read_bytes()
        for rec in shard["records"]:
            dtype = rec["dtype"]
            if dtype == "bfloat16":
                import ml_dtypes

                dtype = ml_dtypes.bfloat16
            data = raw[rec["byteOffset"]: rec["byteOffset"] + rec["nbytes"]]
            out[rec["name"]] = np.frombuffer(data, dtype=dtype).reshape(rec["shape"])
    return out


def model_from_artifact(art):
    """A float32 PyTorch model holding exactly the artifact's weights (q4 dequantized, layouts undone)."""
    import torch
    from blockffn.artifacts.q4 import dequantize, quantized_name
    from blockffn.model import BlockFFNForCausalLM

    arrays = read_tensor_cache(art)
    model = BlockFFNForCausalLM(art.config)
    state = {}
    for name, ref in model.state_dict().items():
        qname = quantized_name(name, "q_weight")
        if qname in arrays:
            w = dequantize(arrays[qname], arrays[quantized_name(name, "q_scale")]).astype(np.float32)
            if name.endswith("mlp.up_proj"):  # [E, De, d] -> [E*De, d]
                w = w.reshape(-1, w.shape[-1])
            elif name.endswith("mlp.down_proj"):  # [E, d, De] -> [d, E*De]
                w = w.transpose(1, 0, 2).reshape(w.shape[1], -1)
        elif name in arrays:
            w = arrays[name].astype(np.float32)
            if name.endswith("mlp.down_proj"):  # stored transposed [E*De, d]
                w = w.T
        else:
            raise BlockFFNError(f"{art.path}: tensor {name} missing from the tensor cache")
        if tuple(w.shape) != tuple(ref.shape):
            raise BlockFFNError(f"{art.path}: tensor {name} has shape {list(w.shape)}, the model expects "
                                f"{list(ref.shape)}")
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    model.load_state_dict(state)
    return model.eval()


def evaluate_artifact(artifact_dir, split, seq_len: int, max_tokens: int | None = None,
                      bytes_per_token: float | None = None, device: str = "cpu") -> dict:
    """`blockffn.train.evaluate.evaluate`'s result for a compiled artifact: ``loss``/``ppl``/``bpb``/``tokens``
    from running the library (plain causal windows), sparsity metrics and ``per_layer`` from its weights
    (``torch_ppl``: the rebuilt model's perplexity with document masks, as `blockffn eval --model` reports it)."""
    from blockffn.runtime.engine import Engine
    from blockffn.train.evaluate import evaluate

    engine = Engine(artifact_dir, device=device)
    run = artifact_window_nll(engine, split.tokens, seq_len, max_tokens)
    result = evaluate(model_from_artifact(engine.art), split, seq_len, max_tokens)
    result["torch_ppl"] = result["ppl"]
    result.update(run)
    result["bpb"] = run["loss"] / math.log(2) / bytes_per_token if bytes_per_token else None
    result["quantization"] = engine.art.manifest["quantization"]
    return result
