"""TLS, CLS_s and reuse ratio against direct set arithmetic."""

import numpy as np
import pytest
import torch

from blockffn.train.metrics import SparsityStats


def brute_force(act, doc_pos, s):
    """act [T, E] bool for one layer/row."""
    T, E = act.shape
    tls = 1 - act.sum() / (T * E)
    valid = [t for t in range(T) if doc_pos[t] > 0]
    n = len(valid) // s
    union = sum(len(set().union(*[set(np.flatnonzero(act[valid[w * s + j]])) for j in range(s)]))
                for w in range(n))
    cls = 1 - union / (n * E)
    ratios = []
    for t in range(T - 1):
        if doc_pos[t + 1] == 0:
            continue
        cur, nxt = set(np.flatnonzero(act[t])), set(np.flatnonzero(act[t + 1]))
        if cur:
            ratios.append(len(cur & nxt) / len(cur))
    return tls, cls, float(np.mean(ratios))


@pytest.mark.parametrize("s", [1, 2, 4, 8])
def test_metrics_match_set_arithmetic(s):
    rng = np.random.default_rng(s)
    T, E = 40, 12
    act = rng.random((T, E)) < 0.3
    doc_pos = np.concatenate([np.arange(17), np.arange(23)])
    logits = torch.from_numpy(np.where(act, 1.0, -1.0)).float()[None]
    stats = SparsityStats(1, E, windows=(s,))
    stats.update([logits], torch.from_numpy(doc_pos)[None])
    got = stats.summary()
    tls, cls, reuse = brute_force(act, doc_pos, s)
    assert got["tls"] == pytest.approx(tls)
    assert got["cls"][str(s)] == pytest.approx(cls)
    assert got["reuse"] == pytest.approx(reuse)
    assert stats.per_layer()["active"][0] == pytest.approx(act.sum() / T)  # experts active per token


def test_identical_consecutive_tokens_give_full_reuse_and_cls_equal_tls():
    act = np.zeros((16, 8), bool)
    act[:, [1, 5]] = True
    stats = SparsityStats(2, 8)
    logits = torch.from_numpy(np.where(act, 1.0, -1.0)).float()[None]
    stats.update([logits, logits], torch.arange(16)[None])
    r = stats.summary()
    assert r["reuse"] == 1.0 and r["tls"] == 0.75
    assert [r["cls"][k] for k in ("1", "2", "4", "8")] == [pytest.approx(0.75)] * 4
    assert r["cls"]["16"] is None  # 15 valid tokens: no 16-token window
