"""Nucleus (top-p) filtering in numpy: the one implementation behind every sampling path (the PyTorch reference's
`blockffn.model.speculative.sampling_probs` and the artifact runtime's `blockffn.runtime.sampling`), torch-free."""

from __future__ import annotations

import numpy as np


def top_p_filter(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (the top token always), renormalised.
    p [..., V] -> [..., V] float64."""
    p = np.asarray(p, dtype=np.float64)
    if top_p >= 1.0:
        return p / p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1, kind="stable")
    sp = np.take_along_axis(p, order, -1)
    before = np.cumsum(sp, -1)  # mass of the more likely tokens, summed in order (not cumsum - p: rounding
    before = np.concatenate([np.zeros_like(before[..., :1]), before[..., :-1]], -1)  # keeps an extra token)
    keep = before < top_p
    keep[..., 0] = True  # the top token even at top_p <= 0 (else nothing is kept: 0/0)
    sp = np.where(keep, sp, 0.0)
    out = np.zeros_like(p)
    np.put_along_axis(out, order, sp, -1)
    return out / out.sum(-1, keepdims=True)
