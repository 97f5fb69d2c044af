"""Language-model and sparsity evaluation over fixed windows of a packed split (used by training and `eval`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from blockffn.data.prepare import PackedSplit
from blockffn.errors import DataError
from blockffn.train.device import to_device
from blockffn.train.metrics import SparsityStats


def window_batch(split: PackedSplit, starts, seq_len: int) -> dict[str, torch.Tensor]:
    """Tokens [B, T+1] (inputs + next-token targets) and per-token document ids / positions for the inputs."""
    toks, docs, poss = [], [], []
    for s in starts:
        toks.append(np.asarray(split.tokens[s: s + seq_len + 1], dtype=np.int64))
        doc, pos = split.doc_index(s, seq_len)
        docs.append(doc - doc[0])
        poss.append(pos)
    tokens = torch.from_numpy(np.stack(toks))
    doc_pos = torch.from_numpy(np.stack(poss))
    # A window starting mid-document has no access to the earlier tokens: restart positions there so attention
    # and RoPE see the window as a document prefix.  doc_pos keeps the true offset for the metrics.
    positions = doc_pos.clone()
    first_doc = torch.from_numpy(np.stack(docs)) == 0
    positions[first_doc] -= positions[:, :1].expand_as(positions)[first_doc]
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_ids": torch.from_numpy(np.stack(docs)),
            "doc_pos": doc_pos, "positions": positions}


def eval_windows(n_tokens: int, seq_len: int, max_tokens: int | None) -> list[int]:
    """Consecutive non-overlapping window starts covering the split (deterministic)."""
    n = (n_tokens - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    return [i * seq_len for i in range(n)]


@torch.no_grad()
def evaluate(model, split: PackedSplit, seq_len: int = 256, max_tokens: int | None = None, batch_size: int = 8,
             bytes_per_token: float | None = None, sparse: bool = False) -> dict:
    """Mean next-token loss, perplexity, bits per byte and sparsity metrics.  Returns a dict; ``per_layer`` holds
    numpy arrays."""
    cfg = model.config
    was_training = model.training
    model.eval()
    starts = eval_windows(len(split.tokens), seq_len, max_tokens)
    if not starts:
        raise DataError(f"evaluation text has {len(split.tokens)} tokens; need more than --seq-len {seq_len}")
    stats = SparsityStats(cfg.num_hidden_layers, cfg.num_experts)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        batch = to_device(window_batch(split, starts[i: i + batch_size], seq_len), device)
        out = model(batch["input_ids"], positions=batch["positions"], doc_ids=batch["doc_ids"], sparse=sparse)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        nll += loss.item()
        count += batch["labels"].numel()
        stats.update(out.router_logits, batch["doc_pos"])
    model.train(was_training)
    mean = nll / count
    result = {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}
    result["bpb"] = mean / math.log(2) / bytes_per_token if bytes_per_token else None
    result.update(stats.summary())
    result["per_layer"] = stats.per_layer()
    return result
