"""OutlineBlockFFN: find BlockFFN layers in an imported graph by their structure and make them BlockFFN subroutines.

A graph from another frontend (``tvm.relax.frontend.onnx``) computes each BlockFFN layer inline, as ordinary
operators over weight constants.  This pass recognises the layer by what it computes, not by names:

    a0   = matmul(x, R)                       R  const [d, E]          (router; or permute_dims of [E, d])
    gate = rmsnorm(relu(a0)) * w              w  const [E]             (rms_norm, or mean/pow/add/sqrt/divide,
                                                                        multiply by rsqrt, in either operand order)
    h    = silu(matmul(x, U))                 U  const [d, E*De]       (silu, or u * sigmoid(u))
    y    = matmul(reshape(reshape(h, [.., E, De]) * expand(gate), [.., E*De]), D)    D const [E*De, d]

The same ``x`` must feed the router and the experts.  Each match is replaced by a call to a private ``BlockFFN*``
function of the canonical signature (x, router [E, d], router_norm [E], up [E*De, d], down_t [E*De, d]), the form
`blockffn.relax_passes.lower_sparse_ffn.LowerBlockFFNSparse` lowers to the union-sparse kernels; the inline
operators are left to dead-code elimination.  ``matched`` records, per function, how many layers were outlined, and
``unmatched`` why each ReLU-after-matmul candidate (a router) was not.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from blockffn.relax_passes.graph_match import Graph, NoMatch
from blockffn.relax_passes.lower_sparse_ffn import BLOCKFFN_SUBROUTINE

ONNX_SUBROUTINE = BLOCKFFN_SUBROUTINE + "_outlined"


def _silu_input(g: Graph, h):
    if g.is_call(h, "relax.nn.silu"):
        return g.call(h, "relax.nn.silu").args[0]
    mul = g.call(h, "relax.multiply")
    for u, s in g.operands(mul):
        if g.is_call(s, "relax.sigmoid") and g.same(g.call(s, "relax.sigmoid").args[0], u):
            return u
    raise NoMatch("the expert activation is not SiLU")


def _mean_square_eps(g: Graph, ms_eps, r) -> float:
    """eps of ``ms_eps = mean(r^2, axis=-1) + eps``; raises unless it is over ``r``."""
    add = g.call(ms_eps, "relax.add")
    for ms, eps in g.operands(add):
        if g.is_call(ms, "relax.mean"):
            break
    else:
        raise NoMatch("the RMS normalizer has no mean")
    mean = g.call(ms, "relax.mean")
    ndim = mean.args[0].ty.ndim
    if [int(a) % ndim for a in mean.attrs.axis] != [ndim - 1]:
        raise NoMatch("the router RMSNorm does not reduce over the experts axis")
    if g.is_call(mean.args[0], "relax.power"):
        p = g.call(mean.args[0], "relax.power")
        squares = g.scalar(p.args[1]) == 2.0 and g.same(p.args[0], r)
    else:
        m = g.call(mean.args[0], "relax.multiply")
        squares = g.same(m.args[0], r) and g.same(m.args[1], r)
    if not squares:
        raise NoMatch("the RMS normalizer does not square the router activations")
    return g.scalar(eps)


def _inverse_rms_eps(g: Graph, inv, r) -> float:
    """eps of ``inv = 1 / sqrt(mean(r^2, -1) + eps)`` (or ``rsqrt``)."""
    if g.is_call(inv, "relax.rsqrt"):
        return _mean_square_eps(g, g.call(inv, "relax.rsqrt").args[0], r)
    div = g.call(inv, "relax.divide")
    if g.scalar(div.args[0]) != 1.0:
        raise NoMatch("the RMS normalizer is not 1 / sqrt(...)")
    return _mean_square_eps(g, g.call(div.args[1], "relax.sqrt").args[0], r)


def _gate(g: Graph, gate) -> tuple[object, np.ndarray, float]:
    """(router input ReLU value, norm weight [E], eps) of ``gate = rmsnorm(relu(a0)) * w``."""
    if g.is_call(gate, "relax.nn.rms_norm"):
        call = g.call(gate, "relax.nn.rms_norm")
        return call.args[0], g.const(call.args[1]), float(call.attrs.epsilon)
    mul = g.call(gate, "relax.multiply")
    for w, normed in g.operands(mul):
        try:
            weight = g.const(w)
            n = g.call(normed, "relax.multiply", "relax.divide")
            if n.op.name == "relax.divide":  # r / sqrt(mean(r^2) + eps)
                r = n.args[0]
                return r, weight, _mean_square_eps(g, g.call(n.args[1], "relax.sqrt").args[0], r)
            for r, inv in g.operands(n):
                if g.is_call(r, "relax.nn.relu"):
                    return r, weight, _inverse_rms_eps(g, inv, r)
        except NoMatch:
            continue
    raise NoMatch("the gate is not RMSNorm(ReLU(router)) times a weight")


def _expert_outputs(g: Graph, hr):
    """(E, De, expert input x, up weight [d, E*De]) of ``hr = reshape(silu(matmul(x, U)), [.., E, De])``."""
    per_expert = g.call(hr, "relax.reshape")
    shape = per_expert.ty.shape.values if per_expert.ty.shape is not None else []
    if len(shape) < 2 or not all(isinstance(v, tvm.tirx.IntImm) for v in shape[-2:]) or int(shape[-1]) == 1:
        raise NoMatch("the expert axis is not static")
    up = g.call(_silu_input(g, per_expert.args[0]), "relax.matmul")
    return int(shape[-2]), int(shape[-1]), up.args[0], g.const(up.args[1])


def match_blockffn(g: Graph, y) -> dict:
    """The weights and input of the BlockFFN layer whose output is ``y`` (the down-projection matmul)."""
    down = g.call(y, "relax.matmul")
    w_down = g.const(down.args[1])  # [E*De, d]
    prod = g.call(g.call(down.args[0], "relax.reshape").args[0], "relax.multiply")
    why = NoMatch("the expert outputs are not scaled per expert by a gate")
    for hr, ge in g.operands(prod):  # which operand is which: the one that parses as experts
        try:
            E, De, x, w_up = _expert_outputs(g, hr)
            gate_src = g.call(ge, "relax.expand_dims", "relax.reshape").args[0]
            break
        except NoMatch as e:
            why = e
    else:
        raise why
    r, w_norm, eps = _gate(g, gate_src)
    a0 = g.call(r, "relax.nn.relu").args[0]
    router = g.call(a0, "relax.matmul")
    if not g.same(router.args[0], x):
        raise NoMatch("the router and the experts read different inputs")
    w_router = g.const(router.args[1])  # [d, E]
    d = w_up.shape[0]
    if (w_up.shape != (d, E * De) or w_down.shape != (E * De, d) or w_router.shape != (d, E)
            or w_norm.reshape(-1).shape != (E,)):
        raise NoMatch(f"weight shapes do not form E={E} experts of De={De} over d={d}")
    if x.ty.ndim != 3:
        raise NoMatch("the layer input is not [batch, tokens, hidden]")
    return {"x": x, "router": np.ascontiguousarray(w_router.T), "norm": w_norm.reshape(E),
            "up": np.ascontiguousarray(w_up.T), "down_t": np.ascontiguousarray(w_down), "eps": eps, "E": E, "De": De}


def _dense_subroutine(bb: relax.BlockBuilder, m: dict, dtype: str) -> tvm.ir.GlobalVar:
    """The canonical dense BlockFFN function (the body `relax_model.BlockFFN.dense` emits) for a match's shapes."""
    E, De, d = m["E"], m["De"], m["up"].shape[1]
    b, s = tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64")
    params = [relax.Var("x", relax.TensorType([b, s, d], dtype)),
              relax.Var("router_proj_weight", relax.TensorType([E, d], dtype)),
              relax.Var("router_norm_weight", relax.TensorType([E], dtype)),
              relax.Var("up_proj", relax.TensorType([E * De, d], dtype)),
              relax.Var("down_proj", relax.TensorType([E * De, d], dtype))]
    x, router, norm, up, down = params
    op = relax.op
    with bb.function(ONNX_SUBROUTINE, params, private=True):
        with bb.dataflow():
            a0 = bb.emit(op.matmul(x, op.permute_dims(router)))
            gate = bb.emit(op.nn.rms_norm(op.nn.relu(a0), norm, axes=[-1], epsilon=m["eps"]))
            h = bb.emit(op.nn.silu(op.matmul(x, op.permute_dims(up))))
            h = bb.emit(op.reshape(op.multiply(op.reshape(h, [b, s, E, De]), op.reshape(gate, [b, s, E, 1])),
                                   [b, s, E * De]))
            out = bb.emit_output(op.matmul(h, down))
        return bb.emit_func_output(out)


@mutator
class _Outline(PyExprMutator):
    def __init__(self, mod, replacements):
        super().__init__(mod)
        self.replacements = replacements  # output var -> Call of the subroutine (args in the old var space)

    def visit_var_binding_(self, binding):  # noqa: N802 - TVM visitor naming
        call = self.replacements.get(binding.var)
        if call is None:
            return super().visit_var_binding_(binding)
        new = self.builder_.emit(relax.Call(call.op, [self.visit_expr(a) for a in call.args]), binding.var.name)
        self.set_var_remap(binding.var, new)


@tvm.transform.module_pass(opt_level=0, name="OutlineBlockFFN")
class OutlineBlockFFN:
    """Outline every BlockFFN layer found by structure in the module's Relax functions (see the module doc)."""

    def __init__(self):
        self.matched: dict[str, int] = {}
        self.unmatched: dict[str, list[str]] = {}
        self._subroutines: dict = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self._subroutines = {}
        bb = relax.BlockBuilder(mod)
        plans = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, relax.Function) or gv.name_hint.startswith(BLOCKFFN_SUBROUTINE):
                continue
            plans[gv] = self._plan(bb, gv.name_hint, func)
        mod = bb.get()
        for gv, replacements in plans.items():
            if replacements:
                mod[gv] = _Outline(mod, replacements).visit_expr(mod[gv])
        return relax.transform.DeadCodeElimination()(mod)

    def _plan(self, bb, name: str, func: relax.Function) -> dict:
        g = Graph(func)
        subroutines = self._subroutines
        replacements, misses = {}, []
        for var, value in g.defs.items():
            if not (isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.matmul"))):
                continue
            if not _reads_gated_experts(g, value):
                continue
            try:
                m = match_blockffn(g, var)
            except NoMatch as e:
                misses.append(f"{var.name}: {e}")
                continue
            dtype = str(var.ty.dtype)
            key = (m["E"], m["De"], m["up"].shape[1], m["eps"], dtype)
            if key not in subroutines:  # one function per layer shape: every layer calls it with its weights
                subroutines[key] = _dense_subroutine(bb, m, dtype)
            consts = [relax.const(m[k].astype(dtype)) for k in ("router", "norm", "up", "down_t")]
            replacements[var] = relax.Call(subroutines[key], [m["x"], *consts])
        self.matched[name] = len(replacements)
        if misses:
            self.unmatched[name] = misses
        return replacements


def _reads_gated_experts(g: Graph, matmul: relax.Call) -> bool:
    """Cheap pre-filter: a matmul of a constant over reshape(multiply(...)) (the down-projection's shape)."""
    try:
        g.const(matmul.args[1])
        g.call(g.call(matmul.args[0], "relax.reshape").args[0], "relax.multiply")
        return True
    except NoMatch:
        return False
