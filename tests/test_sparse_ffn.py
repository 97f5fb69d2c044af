"""The union-sparse FFN computes exactly what the dense FFN computes (the acceleration's correctness premise)."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockffn.model.modeling import BlockFFN
from tests.conftest import max_rel_err, small_config


def ffn_with_pattern(mask: np.ndarray, seed: int = 0):
    """A BlockFFN and inputs x [T, d] whose router activates exactly `mask` [T, E] (solved by least squares)."""
    cfg = small_config()
    torch.manual_seed(seed)
    ffn = BlockFFN(cfg)
    torch.nn.init.normal_(ffn.up_proj, std=0.05)
    torch.nn.init.normal_(ffn.down_proj, std=0.05)
    with torch.no_grad():
        ffn.router_norm.weight.uniform_(0.5, 1.5)
    T, E = mask.shape
    x = torch.randn(T, cfg.hidden_size, dtype=torch.float64)
    magnitude = torch.rand(T, E, dtype=torch.float64) + 0.5
    target = torch.where(torch.from_numpy(mask), magnitude, -magnitude)  # A0 = x @ W_r^T
    w_r = torch.linalg.lstsq(x, target).solution.T  # [E, d], exact because T < d
    with torch.no_grad():
        ffn.router_proj.weight.copy_(w_r.float())
    return ffn, x.float()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.sampled_from(["none", "all", "random", "one-token-empty"]), st.integers(0, 2**16))
def test_sparse_equals_dense_on_router_patterns(T, kind, seed):
    E = small_config().num_experts
    rng = np.random.default_rng(seed)
    mask = {"none": np.zeros((T, E), bool), "all": np.ones((T, E), bool)}.get(kind)
    if mask is None:
        mask = rng.random((T, E)) < rng.uniform(0.05, 0.6)
        if kind == "one-token-empty":
            mask[rng.integers(T)] = False
    ffn, x = ffn_with_pattern(mask, seed)
    a0, g = ffn.route(x)
    assert torch.equal(a0 > 0, torch.from_numpy(mask)), "router did not realise the requested pattern"
    assert torch.equal(g != 0, a0 > 0)
    dense, _ = ffn(x)
    sparse, _ = ffn.forward_sparse(x)
    if not mask.any():
        assert torch.count_nonzero(dense) == 0 and torch.count_nonzero(sparse) == 0
    else:
        assert max_rel_err(sparse, dense) <= 1e-5
    # a token that activates nothing gets exactly zero output from both paths
    for t in np.flatnonzero(~mask.any(1)):
        assert torch.count_nonzero(sparse[t]) == 0 and torch.count_nonzero(dense[t]) == 0


def test_activity_is_decided_before_the_norm_weight():
    """A negative router_norm weight must not hide an active expert (the official CUDA kernel's quirk)."""
    mask = np.array([[True, False] * 8])
    ffn, x = ffn_with_pattern(mask)
    with torch.no_grad():
        ffn.router_norm.weight.fill_(-1.0)
    dense, _ = ffn(x)
    sparse, _ = ffn.forward_sparse(x)
    assert max_rel_err(sparse, dense) <= 1e-5 and dense.abs().max() > 0


def test_model_sparse_forward_matches_dense(small_model):
    ids = torch.randint(0, small_model.config.vocab_size, (2, 24))
    with torch.no_grad():
        dense = small_model(ids)
        sparse = small_model(ids, sparse=True)
    assert max_rel_err(sparse.logits, dense.logits) <= 1e-5
    assert torch.equal(dense.router_logits[0], sparse.router_logits[0])  # same input -> same router
    for a, b in zip(dense.router_logits, sparse.router_logits):
        assert max_rel_err(b, a) <= 1e-5
