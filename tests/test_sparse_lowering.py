"""The chunk-sparse lowering pass: IR properties, and lowered == dense on random router patterns (CPU build)."""

import re

import numpy as np
import pytest
import tvm
import tvm_ffi
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax
from tvm.relax.frontend import nn

from blockffn.compiler.relax_model import SingleBlockFFN, export_model
from blockffn.relax_passes.lower_sparse_ffn import LowerBlockFFNSparse, blockffn_functions
from tests.conftest import small_config

TARGET = tvm.target.Target({"kind": "llvm"})


def calls_to(func, predicate):
    found = []

    @relax.expr_functor.visitor
    class V(relax.expr_functor.PyExprVisitor):
        def visit_call_(self, call):  # noqa: N802
            if isinstance(call.op, tvm.ir.GlobalVar) and predicate(call.op.name_hint):
                found.append(call.op.name_hint)
            super().visit_call_(call)

    V().visit_expr(func)
    return found


def _ffn_vm(chunk):
    cfg = small_config()
    mod, named = SingleBlockFFN(cfg).export()
    mod = LowerBlockFFNSparse({"sparse": chunk})(mod)
    ex = tvm.compile(mod, TARGET)
    return cfg, relax.VirtualMachine(ex, tvm.cpu()), [n for n, _ in named]


@pytest.fixture(scope="module")
def ffn_vm():
    return _ffn_vm(None)


@pytest.fixture(scope="module")
def chunked_ffn_vm():
    return _ffn_vm(4)  # prefill's chunked union, with a chunk small enough for many chunks per call


def numpy_dense(x, w_r, w_n, up, down_t, E, De, eps):
    a0 = x @ w_r.T
    a1 = np.maximum(a0, 0)
    g = a1 / np.sqrt((a1 ** 2).mean(-1, keepdims=True) + eps) * w_n
    h = x @ up.T
    h = h / (1 + np.exp(-h))
    h = (h.reshape(len(x), E, De) * g[:, :, None]).reshape(len(x), E * De)
    return h @ down_t


def check_lowered_equals_dense(ffn_vm, T, kind, seed):
    cfg, vm, _ = ffn_vm
    E, De, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    rng = np.random.default_rng(seed)
    mask = {"none": np.zeros((T, E), bool), "all": np.ones((T, E), bool)}.get(kind)
    if mask is None:
        mask = rng.random((T, E)) < (0.5 if kind == "random" else 0.08)
        if kind == "empty-chunk":  # a chunk (of 4) whose tokens activate nothing, next to busy ones
            mask[4:8] = False
    x = rng.standard_normal((T, d))
    target = np.where(mask, rng.random((T, E)) + 0.5, -(rng.random((T, E)) + 0.5))
    w_r = np.linalg.lstsq(x, target, rcond=None)[0].T  # router weights that realise the pattern exactly
    w_n = rng.uniform(0.5, 1.5, E)
    up = rng.standard_normal((E * De, d)) * 0.05
    down_t = rng.standard_normal((E * De, d)) * 0.05
    params = [tvm.runtime.tensor(a.astype("float32")) for a in (w_r, w_n, up, down_t)]
    x32 = tvm.runtime.tensor(x.astype("float32")[None])
    assert np.array_equal(x.astype("float32") @ w_r.astype("float32").T > 0, mask)
    sparse = vm["sparse"](x32, params).numpy()[0]
    dense = vm["dense"](x32, params).numpy()[0]
    ref = numpy_dense(*(a.astype("float32").astype(np.float64) for a in (x, w_r, w_n, up, down_t)), E, De,
                      cfg.rms_norm_eps)
    if not mask.any():
        assert not sparse.any() and not dense.any()
        return
    scale = np.abs(dense).max()
    assert np.abs(sparse - dense).max() / scale <= 1e-5
    assert np.abs(sparse - ref).max() / np.abs(ref).max() <= 1e-5
    for t in np.flatnonzero(~mask.any(1)):  # a token with no active expert gets exactly zero
        assert not sparse[t].any()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.sampled_from(["none", "all", "random", "sparse"]), st.integers(0, 2**16))
def test_lowered_ffn_equals_dense(ffn_vm, T, kind, seed):
    check_lowered_equals_dense(ffn_vm, T, kind, seed)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.sampled_from(["none", "all", "random", "sparse", "empty-chunk"]),
       st.integers(0, 2**16))
def test_chunked_union_ffn_equals_dense(chunked_ffn_vm, T, kind, seed):
    check_lowered_equals_dense(chunked_ffn_vm, T, kind, seed)


@pytest.mark.parametrize("chunk", [None, 3, 8])
def test_union_kernel_per_chunk(chunk):
    """idx/count of each chunk are exactly the experts any of its tokens activates, ascending."""
    from blockffn.schedules import sparse_cpu

    E, T = 12, 17
    rng = np.random.default_rng(chunk or 0)
    a0 = np.where(rng.random((T, E)) < 0.2, 1.0, -1.0).astype("float32")
    lib = tvm.compile(tvm.IRModule({"u": sparse_cpu.union_kernel(E, "float32", chunk)}), TARGET)
    n_chunks = 1 if chunk is None else -(-T // chunk)
    idx, cnt = tvm.runtime.tensor(np.full((n_chunks, E), -1, "int32")), tvm.runtime.tensor(np.zeros(n_chunks, "int32"))
    lib["blockffn_union"](tvm.runtime.tensor(a0), idx, cnt)
    for c in range(n_chunks):
        rows = a0[c * chunk: (c + 1) * chunk] if chunk else a0
        want = np.flatnonzero((rows > 0).any(0))
        assert cnt.numpy()[c] == len(want)
        assert list(idx.numpy()[c, :len(want)]) == list(want) and not idx.numpy()[c, len(want):].any()


def test_pass_rewrites_every_selected_function_and_nothing_else():
    cfg = small_config()
    mod, _, _ = export_model(cfg, "float32", TARGET)
    dense_gvs = blockffn_functions(mod)
    assert dense_gvs, "the model must expose its BlockFFN layers as functions"
    selected = ["decode", "batch_verify"]
    before = {gv.name_hint: calls_to(f, lambda n: n.startswith("BlockFFN")) for gv, f in mod.functions.items()
              if isinstance(f, relax.Function)}
    for fn in ("prefill", "decode", "batch_prefill", "batch_decode", "batch_verify"):
        assert len(before[fn]) == cfg.num_hidden_layers  # pattern found in every model function
    p = LowerBlockFFNSparse(selected)
    out = p(mod)
    assert p.rewritten == {"decode": cfg.num_hidden_layers, "batch_verify": cfg.num_hidden_layers}
    for fn in selected:  # pattern absent afterwards: only sparse twins are called
        names = calls_to(out[fn], lambda n: n.startswith("BlockFFN"))
        assert names and all(n.endswith("_sparse") for n in names)
    for fn in ("prefill", "batch_prefill", "batch_decode"):  # untouched functions keep the dense layer
        names = calls_to(out[fn], lambda n: n.startswith("BlockFFN"))
        assert names and not any(n.endswith("_sparse") for n in names)


def test_prefill_gets_chunked_union_twins():
    cfg = small_config()
    mod, _, _ = export_model(cfg, "float32", TARGET)
    p = LowerBlockFFNSparse({"decode": None, "prefill": 16})
    out = p(mod)
    assert p.rewritten == {"decode": cfg.num_hidden_layers, "prefill": cfg.num_hidden_layers}
    assert all(n.endswith("_sparse") for n in calls_to(out["decode"], lambda n: n.startswith("BlockFFN")))
    prefill_calls = calls_to(out["prefill"], lambda n: n.startswith("BlockFFN"))
    assert prefill_calls and all(n.endswith("_sparse_c16") for n in prefill_calls)
    kernels = set(re.findall(r"call_tir\((blockffn_\w+)", out[prefill_calls[0]].script()))
    assert len(kernels) == 3 and all(k.endswith("_c16") for k in kernels)  # union, up, down: per-chunk unions


def test_module_without_blockffn_is_unchanged():
    class Plain(nn.Module):
        def __init__(self):
            self.lin = nn.Linear(8, 8, bias=False)

        def forward(self, x: nn.Tensor):
            return self.lin(x)

    mod, _ = Plain().export_tvm(spec={"forward": {"x": nn.spec.Tensor([2, 8], "float32")}})
    out = LowerBlockFFNSparse(["forward"])(mod)
    assert tvm_ffi.structural_equal(out, mod) and out.same_as(mod)
