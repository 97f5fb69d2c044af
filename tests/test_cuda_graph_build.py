"""`--cuda-graph` builds: every per-layer subroutine is inlined (so TVM's RewriteCUDAGraph never replays one layer's
graph for another), the inlined module keeps every shape and computes exactly what the plain build computes, and
the CUDA library carries the capture/replay regions.  (Replay itself needs a GPU: checked on the H200, see
docs/benchmarks.md.)"""

import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from blockffn import default_model_path
from blockffn.compiler.compile import CompileOptions, compile_model, sparse_functions
from blockffn.compiler.relax_model import export_model
from blockffn.model import load_model, preset_config
from blockffn.relax_passes.add_dense_twins import AddDenseTwins
from blockffn.relax_passes.graph_safe_subroutines import InlineSubroutines
from blockffn.relax_passes.lower_sparse_ffn import LowerBlockFFNSparse
from blockffn.runtime.engine import Engine


def private_calls(func):
    found = []

    @relax.expr_functor.visitor
    class V(relax.expr_functor.PyExprVisitor):
        def visit_call_(self, call):  # noqa: N802
            if isinstance(call.op, tvm.ir.GlobalVar) and call.op.name_hint.startswith("BlockFFN"):
                found.append(call.op.name_hint)
            super().visit_call_(call)

    V().visit_expr(func)
    return found


def shapeless_bindings(func):
    found = []

    @relax.expr_functor.visitor
    class V(relax.expr_functor.PyExprVisitor):
        def visit_var_binding_(self, b):  # noqa: N802
            if isinstance(b.var.ty, relax.TensorType) and not isinstance(b.var.ty.shape, relax.ShapeExpr):
                found.append(str(b.var))
            super().visit_var_binding_(b)

    V().visit_expr(func)
    return found


def test_inlining_removes_every_subroutine_call_and_keeps_every_shape():
    cfg = preset_config("tiny", num_hidden_layers=2)
    mod, _, _ = export_model(cfg, "float16", tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    fns = sparse_functions("auto")
    mod = LowerBlockFFNSparse(fns, family="gpu")(AddDenseTwins(list(fns))(mod))
    before = {gv.name_hint: len(private_calls(f)) for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
    assert before["decode"] == before["prefill"] == 2  # one BlockFFN call per layer, static and symbolic shapes
    mod = InlineSubroutines(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            assert not private_calls(func), gv.name_hint
            assert not shapeless_bindings(func), gv.name_hint
    assert not [gv for gv in mod.get_global_vars() if gv.name_hint.startswith("BlockFFN")]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    for name, graph in (("plain", False), ("graph", True)):
        compile_model(CompileOptions(model_dir=default_model_path(), output=root / name, context_window=256,
                                     prefill_chunk=64, draft="none", cuda_graph=graph))
    return root


def test_inlined_build_computes_what_the_plain_build_computes(builds):
    ids = list(np.random.default_rng(0).integers(0, 4096, 70))  # two prefill chunks
    out = {}
    for name in ("plain", "graph"):
        engine = Engine(builds / name)
        engine.add_sequence(0)
        logits = [engine.prefill(0, ids)]
        for _ in range(4):
            logits.append(engine.decode(0, int(np.argmax(logits[-1]))))
        out[name] = np.stack(logits)
    assert np.abs(out["plain"] - out["graph"]).max() <= 1e-5 * np.abs(out["plain"]).max()
    assert (out["plain"].argmax(-1) == out["graph"].argmax(-1)).all()


def test_inlined_build_generates_the_pytorch_greedy_tokens(builds):
    from blockffn.model.generate import SamplingParams, generate

    model = load_model(default_model_path())
    ids = [1, 262, 641, 271, 262, 684]
    ref = generate(model, ids, SamplingParams(greedy=True, max_tokens=24, stop_at_eos=False))["tokens"]
    engine = Engine(builds / "graph")
    engine.add_sequence(0)
    logits, got = engine.prefill(0, ids), []
    for _ in range(24):
        got.append(int(np.argmax(logits)))
        logits = engine.decode(0, got[-1])
    assert got == ref


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
def test_cuda_graph_library_captures_decode(tmp_path):
    lib = tmp_path / "m.so"
    compile_model(CompileOptions(model_dir=default_model_path(), target="cuda", arch="sm_90", quantization="q0f16",
                                 output=lib, context_window=256, prefill_chunk=64, cuda_graph=True))
    text = lib.read_bytes()
    assert b"vm.builtin.cuda_graph.run_or_capture" in text
    plain = tmp_path / "p.so"
    compile_model(CompileOptions(model_dir=default_model_path(), target="cuda", arch="sm_90", quantization="q0f16",
                                 output=plain, context_window=256, prefill_chunk=64))
    assert b"vm.builtin.cuda_graph.run_or_capture" not in plain.read_bytes()
