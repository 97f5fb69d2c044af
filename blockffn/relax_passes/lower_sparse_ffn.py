"""LowerBlockFFNSparse: compute each BlockFFN layer over the union of the experts its tokens activate.

The Relax model emits every BlockFFN layer as a call to a private function ``BlockFFN*`` with the arguments
``(x [b, s, d], router [E, d], router_norm [E], up [E·De, d], down_t [E·De, d])`` (dense body).  For every
function named in ``functions`` (e.g. ``decode``, ``batch_verify``) this pass redirects those calls to a
``BlockFFN*_sparse`` twin:

    a0   = x · routerᵀ                      (Relax matmul; same router as the dense path)
    gate = RMSNorm(ReLU(a0)) ⊙ router_norm  (Relax)
    idx, count = union(a0)                  (TIR: experts with a0 > 0 for any token of the call; on GPUs one
                                             `route` kernel computes gate, idx and count)
    h    = up(x, gate, up, idx, count)      (TIR: gathered up-projection, SiLU, per-token gate)
    y    = down(h, down_t, idx, count)      (TIR: gathered down-projection, fp32 accumulation)

With q4 expert weights (7 parameters: ``x, router, router_norm, up_q, up_s, down_q, down_s``, see
`blockffn.compiler.quantization`) the twin calls the q4 kernels of ``blockffn.schedules.sparse_q4`` instead,
which dequantize each gathered expert slab in their inner loop; the router stays in full precision.

For prefill a union over the whole call would cover nearly every expert; there the twin takes a union per chunk of
``C`` consecutive tokens (``idx [NC, E]``, ``count [NC]``; see ``blockffn.schedules.chunking``) and each token's
FFN runs over its chunk's union.

Calls from other functions keep the dense body, so one module can mix policies (dense prefill, sparse decode).
A module without BlockFFN functions passes through unchanged.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from blockffn.relax_passes.graph_match import Graph, NoMatch
from blockffn.schedules import sparse_gpu

BLOCKFFN_SUBROUTINE = "BlockFFN"  # name prefix of the Relax functions that hold one BlockFFN layer (the frontends'
SPARSE_SUFFIX = "_sparse"  # contract with this pass: blockffn.compiler.relax_model, OutlineBlockFFN)


def blockffn_functions(mod: tvm.IRModule) -> dict:
    """GlobalVars of the dense BlockFFN subroutines in ``mod``: the functions a frontend marked with the
    ``BlockFFN`` name prefix, each checked to compute exactly the dense layer this pass replaces (a marked function
    that does not is a frontend bug, refused rather than silently lowered or left dense)."""
    found = {}
    for gv, f in mod.functions.items():
        if not (isinstance(f, relax.Function) and gv.name_hint.startswith(BLOCKFFN_SUBROUTINE)
                and SPARSE_SUFFIX not in gv.name_hint):
            continue
        why = dense_body_mismatch(f)
        if why is not None:
            raise ValueError(f"{gv.name_hint} is marked as a BlockFFN layer but {why}")
        found[gv] = f
    return found


def dense_body_mismatch(func: relax.Function) -> str | None:
    """None when ``func`` computes the dense BlockFFN over its own parameters, else what differs.  The precondition
    of the lowering, stated as structure:

        (x, router [E, d], router_norm [E], up [E·De, d], down_t [E·De, d])       fp weights, or
        (x, router, router_norm, up_q, up_s, down_q, down_s)                      q4 experts (call_tir kernels)
        gate = rms_norm(relu(matmul(x, permute_dims(router))), router_norm)
        h    = silu(matmul(x, permute_dims(up)))            | silu(call_tir(up kernel, x, up_q, up_s))
        out  = matmul(reshape(reshape(h) * reshape(gate)), down_t) | call_tir(down kernel, that, down_q, down_s)
    """
    params = list(func.params)
    if len(params) not in (5, 7):
        return f"has {len(params)} parameters, not 5 (fp experts) or 7 (q4 experts)"
    x, router, norm, *experts = params
    g = Graph(func)

    def weight(expr, param, transposed: bool) -> None:
        if transposed:
            expr = g.call(expr, "relax.permute_dims").args[0]
        if not g.same(expr, param):
            raise NoMatch(f"does not read {param.name} where the layer reads it")

    def expert_call(expr, inputs):
        if len(experts) == 2:
            mm = g.call(expr, "relax.matmul")
            weight(mm.args[1], inputs[1], transposed=inputs[1] is experts[0])
            return mm.args[0]
        call = g.call(expr, "relax.call_tir")
        fields = list(call.args[1].fields)
        if len(fields) != 3 or not all(g.same(a, b) for a, b in zip(fields[1:], inputs[1:])):
            raise NoMatch("a q4 expert kernel does not read its own weight and scale")
        return fields[0]

    try:
        out = g.value(func.body.body)
        down_in = expert_call(out, (None, experts[-1]) if len(experts) == 2 else (None, *experts[2:]))
        hr, ge = g.call(g.call(down_in, "relax.reshape").args[0], "relax.multiply").args
        silu_in = g.call(g.call(hr, "relax.reshape").args[0], "relax.nn.silu").args[0]
        up_in = expert_call(silu_in, (None, experts[0]) if len(experts) == 2 else (None, *experts[:2]))
        gate = g.call(g.call(ge, "relax.reshape").args[0], "relax.nn.rms_norm")
        weight(gate.args[1], norm, transposed=False)
        a0 = g.call(g.call(gate.args[0], "relax.nn.relu").args[0], "relax.matmul")
        weight(a0.args[1], router, transposed=True)
        if not (g.same(up_in, x) and g.same(a0.args[0], x)):
            raise NoMatch("the router and the experts do not both read x")
    except NoMatch as e:
        return str(e)
    return None


@visitor
class _FindRMSNormEps(PyExprVisitor):
    def __init__(self):
        super().__init__()
        self.eps = None

    def visit_call_(self, call):  # noqa: N802
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.rms_norm":
            self.eps = float(call.attrs.epsilon)
        super().visit_call_(call)


def router_eps(func: relax.Function) -> float:
    v = _FindRMSNormEps()
    v.visit_expr(func)
    if v.eps is None:
        raise ValueError("BlockFFN function without a router RMSNorm")
    return v.eps


def static_tokens(x_ty) -> int | None:
    """Tokens of a call whose shape is static (decode: 1), else None."""
    dims = x_ty.shape.values[:-1]
    if not all(isinstance(v, tvm.tirx.IntImm) for v in dims):
        return None
    n = 1
    for v in dims:
        n *= int(v)
    return n


def _kernels(family: str, E: int, De: int, d: int, dtype: str, chunk: int | None, max_lanes: int = 8,
             tile: int = sparse_gpu.TOKEN_TILE):
    """(union, up, down) PrimFuncs; GPUs have no separate union (their `route` kernel computes it with the gate)."""
    if family == "cpu":
        from blockffn.schedules import sparse_cpu as k

        return (k.union_kernel(E, dtype, chunk), k.up_kernel_cpu(E, De, d, dtype, chunk=chunk),
                k.down_kernel_cpu(E, De, d, dtype, chunk=chunk))
    if family == "gpu":
        from blockffn.schedules import sparse_gpu as k

        return (None,
                k.up_kernel_gpu(E, De, d, dtype, chunk=chunk, max_lanes=max_lanes),  # (a tile of 1 measured slower)
                k.down_kernel_gpu(E, De, d, dtype, chunk=chunk, max_lanes=max_lanes, token_tile=tile))
    raise ValueError(f"no sparse kernels for target family {family!r}")


def _q4_kernels(family: str, E: int, De: int, d: int, dtype: str, chunk: int | None,
                tile: int = sparse_gpu.TOKEN_TILE):
    from blockffn.schedules import sparse_q4 as q4

    if family not in ("cpu", "gpu"):
        raise ValueError(f"no sparse kernels for target family {family!r}")
    union = _kernels(family, E, De, d, dtype, chunk)[0]
    if family == "cpu":
        return union, q4.up_kernel_cpu(E, De, d, dtype, chunk=chunk), q4.down_kernel_cpu(E, De, d, dtype, chunk=chunk)
    return (union, q4.up_kernel_gpu(E, De, d, dtype, chunk=chunk, token_tile=tile),
            q4.down_kernel_gpu(E, De, d, dtype, chunk=chunk, token_tile=tile))


def add_gpu_reduce(bb: relax.BlockBuilder, E: int, De: int, d: int, dtype: str, chunk: int | None,
                   quantized: bool, max_lanes: int = 8):
    """(K splits of the GPU down kernel, GlobalVar of the reduce that sums them and casts to ``dtype``)."""
    from blockffn.schedules import sparse_gpu, sparse_q4

    splits = (sparse_q4.down_splits_gpu(E, d, chunk) if quantized
              else sparse_gpu.down_splits(E, De, d, dtype, chunk, max_lanes=max_lanes))
    return splits, bb.add_func(sparse_gpu.reduce_kernel_gpu(d, dtype, splits).without_attr("global_symbol"),
                               f"blockffn_sparse_reduce_s{splits}_d{d}_{dtype}")


def _build_sparse_twin(bb: relax.BlockBuilder, name: str, dense: relax.Function, family: str,
                       chunk: int | None, max_lanes: int = 8) -> tvm.ir.GlobalVar:
    x_ty, router_ty, _, up_ty = [p.ty for p in dense.params[:4]]
    E, d = (int(v) for v in router_ty.shape)
    quantized = len(dense.params) == 7
    De = int(up_ty.shape[1]) if quantized else int(up_ty.shape[0]) // E
    dtype = str(x_ty.dtype)
    eps = router_eps(dense)
    # kernels are private (no global_symbol) so the same kernel added for several layers' twins is deduplicated
    tile = sparse_gpu.token_tile(static_tokens(x_ty))
    kernels = (_q4_kernels(family, E, De, d, dtype, chunk, tile) if quantized
               else _kernels(family, E, De, d, dtype, chunk, max_lanes, tile))
    f_union, f_up, f_down = (f if f is None else f.without_attr("global_symbol") for f in kernels)
    kind = "_q4" if quantized else ""
    tag = "" if chunk is None else f"_c{chunk}"
    ktag = tag + ("" if family != "gpu" or tile == sparse_gpu.TOKEN_TILE else f"_t{tile}")  # kernel names
    gv_union = None if family == "gpu" else bb.add_func(f_union, f"blockffn_union_e{E}{tag}")
    gv_up = bb.add_func(f_up, f"blockffn_sparse_up{kind}_e{E}_de{De}_d{d}_{dtype}{ktag}")
    gv_down = bb.add_func(f_down, f"blockffn_sparse_down{kind}_e{E}_de{De}_d{d}_{dtype}{ktag}")
    splits = None  # GPU kernels: the down-projection is split-K partials plus a reduce that casts
    if family == "gpu":
        splits, gv_reduce = add_gpu_reduce(bb, E, De, d, dtype, chunk, quantized, max_lanes)
    params = [relax.Var(p.name, p.ty) for p in dense.params]
    x, w_router, w_norm = params[:3]
    w_up, w_down = (params[3:5], params[5:7]) if quantized else ([params[3]], [params[4]])
    b, s = x_ty.shape[0], x_ty.shape[1]
    with bb.function(name + SPARSE_SUFFIX + tag, params, private=True):
        with bb.dataflow():
            n = b * s
            n_chunks = 1 if chunk is None else (n + chunk - 1) // chunk
            x2 = bb.emit(relax.op.reshape(x, relax.ShapeExpr([n, d])))
            a0 = bb.emit(relax.op.matmul(x2, relax.op.permute_dims(w_router)))
            union_types = [relax.TensorType((n_chunks, E), "int32"), relax.TensorType((n_chunks,), "int32")]
            if family == "gpu":  # gate and union in one kernel
                gv_route = bb.add_func(sparse_gpu.route_kernel(E, dtype, eps, chunk).without_attr("global_symbol"),
                                       f"blockffn_route_e{E}_{dtype}{tag}")  # (no token tile)
                route = bb.emit(relax.call_tir(gv_route, [a0, w_norm], [relax.TensorType((n, E), dtype)]
                                               + union_types))
                gate, idx, count = (bb.emit(relax.TupleGetItem(route, i)) for i in range(3))
            else:
                gate = bb.emit(relax.op.nn.rms_norm(relax.op.nn.relu(a0), w_norm, axes=[-1], epsilon=eps))
                union = bb.emit(relax.call_tir(gv_union, [a0], union_types))
                idx, count = bb.emit(relax.TupleGetItem(union, 0)), bb.emit(relax.TupleGetItem(union, 1))
            h = bb.emit(relax.call_tir(gv_up, [x2, gate, *w_up, idx, count],
                                       relax.TensorType([n, E, De], "float32")))
            if splits is None:
                y = bb.emit(relax.call_tir(gv_down, [h, *w_down, idx, count], relax.TensorType([n, d], "float32")))
                if dtype != "float32":
                    y = bb.emit(relax.op.astype(y, dtype))
            else:
                part = bb.emit(relax.call_tir(gv_down, [h, *w_down, idx, count],
                                              relax.TensorType([splits, n, d], "float32")))
                y = bb.emit(relax.call_tir(gv_reduce, [part], relax.TensorType([n, d], dtype)))
            out = bb.emit_output(relax.op.reshape(y, relax.ShapeExpr([b, s, d])))
        gv = bb.emit_func_output(out)
    return gv


@mutator
class _Redirect(PyExprMutator):
    def __init__(self, mod, mapping):
        super().__init__(mod)
        self.mapping = mapping
        self.count = 0

    def visit_call_(self, call):  # noqa: N802
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.GlobalVar) and call.op in self.mapping:
            self.count += 1
            return relax.Call(self.mapping[call.op], call.args, call.attrs, call.ty_args)
        return call


@tvm.transform.module_pass(opt_level=0, name="LowerBlockFFNSparse")
class LowerBlockFFNSparse:
    """Redirect BlockFFN calls in ``functions`` to their sparse twins (kernels for ``family``: cpu or gpu).

    ``functions``: names (each call's union over all its tokens), or a dict name -> token chunk size (None: the
    whole call; C: a union per C consecutive tokens, for prefill).  ``max_vector_lanes``: the widest vector type of
    the GPU language (8; Metal: 4)."""

    def __init__(self, functions, family: str = "cpu", max_vector_lanes: int = 8):
        self.chunks = dict(functions) if isinstance(functions, dict) else dict.fromkeys(functions)
        self.family = family
        self.max_lanes = max_vector_lanes
        self.rewritten: dict[str, int] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        dense = blockffn_functions(mod)
        targets = [gv for gv, f in mod.functions.items()
                   if isinstance(f, relax.Function) and gv.name_hint in self.chunks]
        if not dense or not targets:
            return mod
        bb = relax.BlockBuilder(mod)
        mappings = {chunk: {gv: _build_sparse_twin(bb, gv.name_hint, f, self.family, chunk, self.max_lanes)
                            for gv, f in dense.items()}
                    for chunk in sorted({self.chunks[gv.name_hint] for gv in targets}, key=lambda c: c or 0)}
        mod = bb.get()
        builder = relax.BlockBuilder(mod)
        for gv in targets:
            redirect = _Redirect(mod, mappings[self.chunks[gv.name_hint]])
            builder.update_func(gv, redirect.visit_expr(mod[gv]))
            self.rewritten[gv.name_hint] = redirect.count
        return relax.transform.DeadCodeElimination()(builder.get())
