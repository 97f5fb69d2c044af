"""OutlineBlockFFN on hand-written Relax graphs: every spelling of a BlockFFN layer is recognised and, lowered to the
union-sparse kernels, equals a numpy BlockFFN; graphs that are not BlockFFN layers are left alone, with the reason."""

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from blockffn.relax_passes.lower_sparse_ffn import LowerBlockFFNSparse
from blockffn.relax_passes.outline_blockffn import OutlineBlockFFN

E, DE, D, EPS = 8, 16, 32, 1e-6
op = relax.op


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"router": rng.standard_normal((E, D)).astype("float32") * 0.3,
            "norm": rng.uniform(0.5, 1.5, E).astype("float32"),
            "up": rng.standard_normal((E * DE, D)).astype("float32") * 0.2,
            "down": rng.standard_normal((D, E * DE)).astype("float32") * 0.2}


def numpy_blockffn(x, w):
    a0 = x @ w["router"].T
    r = np.maximum(a0, 0)
    g = r / np.sqrt((r * r).mean(-1, keepdims=True) + EPS) * w["norm"]
    u = x @ w["up"].T
    h = (u / (1 + np.exp(-u))).reshape(*x.shape[:-1], E, DE) * g[..., None]
    return h.reshape(*x.shape[:-1], E * DE) @ w["down"].T


def _gate(bb, r, w, spelling):
    """RMSNorm(r) * norm weight, as frontends spell it."""
    norm = relax.const(w["norm"])
    if spelling == "op":
        return bb.emit(op.nn.rms_norm(r, norm, axes=[-1], epsilon=EPS))
    ms = bb.emit(op.add(bb.emit(op.mean(bb.emit(op.power(r, relax.const(2.0))), axis=[-1], keepdims=True)),
                        relax.const(EPS, "float32")))
    if spelling == "decomposed":  # torch.export: x * (1 / sqrt(...)), weight first
        inv = bb.emit(op.divide(relax.const(1.0), bb.emit(op.sqrt(ms))))
        return bb.emit(op.multiply(norm, bb.emit(op.multiply(r, inv))))
    if spelling == "rsqrt":  # operands swapped everywhere
        inv = bb.emit(op.rsqrt(ms))
        return bb.emit(op.multiply(bb.emit(op.multiply(inv, r)), norm))
    if spelling == "divide":
        return bb.emit(op.multiply(bb.emit(op.divide(r, bb.emit(op.sqrt(ms)))), norm))
    raise ValueError(spelling)


def inline_module(w, spelling="decomposed", gate_norm=True, router_input="x"):
    """main(x [1, n, D]) computing one BlockFFN layer inline over constant weights, ONNX-importer style (weights
    pre-transposed for matmul; the router as permute_dims of its [E, D] weight)."""
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([1, n, D], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            src = x if router_input == "x" else bb.emit(op.multiply(x, relax.const(2.0)))
            a0 = bb.emit(op.matmul(src, op.permute_dims(relax.const(w["router"]))))
            r = bb.emit(op.nn.relu(a0))
            g = _gate(bb, r, w, spelling) if gate_norm else bb.emit(op.multiply(r, relax.const(w["norm"])))
            u = bb.emit(op.matmul(x, relax.const(np.ascontiguousarray(w["up"].T))))
            h = (bb.emit(op.nn.silu(u)) if spelling == "op" else
                 bb.emit(op.multiply(bb.emit(op.sigmoid(u)), u)) if spelling == "rsqrt" else
                 bb.emit(op.multiply(u, bb.emit(op.sigmoid(u)))))
            hr = bb.emit(op.reshape(h, [1, n, E, DE]))
            ge = bb.emit(op.expand_dims(g, axis=[3]) if spelling != "rsqrt" else op.reshape(g, [1, n, E, 1]))
            prod = bb.emit(op.multiply(ge, hr) if spelling == "rsqrt" else op.multiply(hr, ge))
            flat = bb.emit(op.reshape(prod, [1, n, E * DE]))
            y = bb.emit_output(op.matmul(flat, relax.const(np.ascontiguousarray(w["down"].T))))
        bb.emit_func_output(y)
    return bb.get()


def run(mod, x):
    ex = relax.build(mod, tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("spelling", ["op", "decomposed", "rsqrt", "divide"])
def test_every_spelling_is_outlined_and_lowered_exactly(spelling):
    w = weights()
    x = np.random.default_rng(1).standard_normal((1, 5, D)).astype("float32")
    mod = inline_module(w, spelling)
    ref = numpy_blockffn(x, w)
    assert np.abs(run(mod, x) - ref).max() <= 1e-4 * np.abs(ref).max()  # the hand-written graph is right
    outline = OutlineBlockFFN()
    mod = outline(mod)
    assert outline.matched == {"main": 1}
    assert [gv.name_hint for gv in mod.functions if gv.name_hint.startswith("BlockFFN")] == ["BlockFFN_outlined"]
    lower = LowerBlockFFNSparse({"main": 2}, family="cpu")
    mod = lower(mod)
    assert lower.rewritten == {"main": 1}
    out = run(mod, x)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_inactive_experts_are_skipped_not_miscounted():
    """Half the experts never fire (router rows pushed negative): the sparse build still equals numpy."""
    w = weights(2)
    w["router"][::2] = -np.abs(w["router"][::2]) - 5.0
    x = np.abs(np.random.default_rng(3).standard_normal((1, 7, D))).astype("float32")
    mod = LowerBlockFFNSparse({"main": None}, family="cpu")(OutlineBlockFFN()(inline_module(w)))
    ref = numpy_blockffn(x, w)
    assert np.abs(run(mod, x) - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("case, reason", [
    ("no-norm", "not RMSNorm(ReLU(router))"),
    ("other-input", "different inputs"),
])
def test_non_blockffn_graphs_are_left_alone(case, reason):
    w = weights()
    mod = inline_module(w, gate_norm=case != "no-norm", router_input="y" if case == "other-input" else "x")
    outline = OutlineBlockFFN()
    out = outline(mod)
    assert outline.matched == {"main": 0}
    assert any(reason in m for m in outline.unmatched["main"])
    assert tvm_ffi.structural_equal(out["main"], mod["main"])


@pytest.mark.parametrize("flaw", ["sigmoid router", "no router norm"])
def test_lowering_refuses_a_marked_function_that_is_not_a_blockffn_layer(flaw):
    """LowerBlockFFNSparse states its precondition: a function named BlockFFN* must compute the dense layer over
    its own parameters; one that does not is refused by name, never lowered to kernels that assume the layer."""
    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([1, n, D], "float32"))
    params = [relax.Var("x", relax.TensorType([1, n, D], "float32")),
              relax.Var("router", relax.TensorType([E, D], "float32")),
              relax.Var("norm", relax.TensorType([E], "float32")),
              relax.Var("up", relax.TensorType([E * DE, D], "float32")),
              relax.Var("down_t", relax.TensorType([E * DE, D], "float32"))]
    px, router, norm, up, down = params
    bb = relax.BlockBuilder()
    with bb.function("BlockFFN_bad", params, private=True):
        with bb.dataflow():
            a0 = bb.emit(op.matmul(px, op.permute_dims(router)))
            act = op.sigmoid(a0) if flaw == "sigmoid router" else op.nn.relu(a0)
            gate = bb.emit(op.multiply(act, norm) if flaw == "no router norm"
                           else op.nn.rms_norm(act, norm, axes=[-1], epsilon=EPS))
            h = bb.emit(op.nn.silu(op.matmul(px, op.permute_dims(up))))
            h = bb.emit(op.reshape(op.multiply(op.reshape(h, [1, n, E, DE]), op.reshape(gate, [1, n, E, 1])),
                                   [1, n, E * DE]))
            out = bb.emit_output(op.matmul(h, down))
        bad = bb.emit_func_output(out)
    w = weights()
    with bb.function("main", [x]):
        with bb.dataflow():
            consts = [relax.const(w["router"]), relax.const(w["norm"]), relax.const(w["up"]),
                      relax.const(np.ascontiguousarray(w["down"].T))]
            y = bb.emit_output(relax.Call(bad, [x, *consts]))
        bb.emit_func_output(y)
    with pytest.raises(ValueError, match="BlockFFN_bad is marked as a BlockFFN layer but"):
        LowerBlockFFNSparse({"main": None}, family="cpu")(bb.get())
