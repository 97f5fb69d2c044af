"""Sparsity metrics of BlockFFN (research/blockffn.md §4.7), accumulated over many windows.

* TLS  = fraction of (token, expert) pairs with a zero gate (A0 <= 0).
* CLS_s = 1 − fraction of (window, expert) pairs where any token of an s-token window activates the expert; windows
  are cut from the valid tokens (the first token of each document dropped), truncated to a multiple of s.
* active = mean number of active experts per token (= E·(1 − TLS) of a layer).
* reuse = mean over tokens t (with t+1 in the same document and ≥1 active expert) of |S_t ∩ S_{t+1}| / |S_t|.
"""

from __future__ import annotations

import numpy as np
import torch

CLS_WINDOWS = (1, 2, 4, 8, 16, 32, 64)


class SparsityStats:
    def __init__(self, num_layers: int, num_experts: int, windows=CLS_WINDOWS):
        self.L, self.E, self.windows = num_layers, num_experts, tuple(windows)
        self.active = np.zeros(num_layers)
        self.tokens = 0
        self.union = {s: np.zeros(num_layers) for s in self.windows}
        self.n_windows = {s: 0 for s in self.windows}
        self.reuse_sum = np.zeros(num_layers)
        self.reuse_n = np.zeros(num_layers)

    @torch.no_grad()
    def update(self, router_logits: list[torch.Tensor], doc_pos: torch.Tensor) -> None:
        """router_logits: per layer [B, T, E]; doc_pos [B, T] (position inside the document)."""
        act = torch.stack([a > 0 for a in router_logits]).cpu()  # [L, B, T, E]
        doc_pos = doc_pos.cpu()
        self.active += act.sum(dim=(1, 2, 3)).double().numpy()
        self.tokens += act.shape[1] * act.shape[2]
        for b in range(act.shape[1]):
            pos = doc_pos[b]
            a = act[:, b]  # [L, T, E]
            valid = a[:, pos > 0]  # first token of each document dropped
            for s in self.windows:
                n = valid.shape[1] // s
                if n == 0:
                    continue
                win = valid[:, : n * s].reshape(self.L, n, s, self.E).any(dim=2)
                self.union[s] += win.sum(dim=(1, 2)).double().numpy()
                self.n_windows[s] += n
            same_doc = pos[1:] > 0  # pair (t, t+1) inside one document
            cur, nxt = a[:, :-1][:, same_doc], a[:, 1:][:, same_doc]
            k = cur.sum(-1)
            keep = k > 0
            ratio = torch.where(keep, (cur & nxt).sum(-1).double() / k.clamp(min=1), torch.zeros((), dtype=torch.float64))
            self.reuse_sum += ratio.sum(-1).numpy()
            self.reuse_n += keep.sum(-1).double().numpy()

    def per_layer(self) -> dict:
        tls = 1 - self.active / max(self.tokens * self.E, 1)
        cls = {str(s): (1 - self.union[s] / (self.n_windows[s] * self.E)) if self.n_windows[s]
               else np.full(self.L, np.nan) for s in self.windows}
        reuse = self.reuse_sum / np.maximum(self.reuse_n, 1)
        return {"tls": tls, "cls": cls, "reuse": reuse, "active": self.active / max(self.tokens, 1)}

    def summary(self) -> dict:
        """Model-level numbers: every (layer, token, expert) pair counts equally, as in the official logging."""
        tls = 1 - self.active.sum() / max(self.tokens * self.E * self.L, 1)
        cls = {str(s): float(1 - self.union[s].sum() / (self.n_windows[s] * self.E * self.L))
               if self.n_windows[s] else None for s in self.windows}  # None: text shorter than one window
        reuse = float(self.reuse_sum.sum() / max(self.reuse_n.sum(), 1))
        return {"tls": float(tls), "cls": cls, "reuse": reuse}


def per_layer_json(per_layer: dict) -> dict:
    """``SparsityStats.per_layer()`` as plain lists for JSON; NaN (no window of that size in the text) becomes None."""
    def floats(values):
        return [None if v != v else float(v) for v in values]

    return {k: ({s: floats(v2) for s, v2 in v.items()} if isinstance(v, dict) else floats(v))
            for k, v in per_layer.items()}
