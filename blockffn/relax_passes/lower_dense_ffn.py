"""LowerBlockFFNDenseDecodeGPU: a single-token dense BlockFFN layer (decode) runs its down-projection through the
split-K GPU down kernel with every expert active.

Why: the down weight is stored transposed (``[E·De, d]``, one contiguous slab per expert, see
`blockffn.artifacts.layout.DOWN_PROJ_TRANSPOSED`), so a decode's dense down-projection is ``h[1, E·De] ·
W[E·De, d]``, a GEMV whose reduction runs over the weight's *outer* axis.  dlight's GEMV rule only takes reductions
over the inner axis; its Matmul fallback launches a few dozen blocks (74 µs per layer of the 2.8B shape on an H200,
≈ 0.9 TB/s).  The sparse path's down kernel already splits that reduction over enough blocks to fill the GPU; with
the identity union (``idx = 0..E-1``, ``count = E``) it computes the dense product, in fp32, over the same bytes.

The rest of the dense body is unchanged Relax (router, gate, up-projection + SiLU: dlight GEMV).  Applies to dense
BlockFFN subroutines with a static token count of at most ``max_tokens`` and full-precision experts; the others
(prefill, verification with a symbolic token count, q4 experts) keep their bodies.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from blockffn.relax_passes.lower_sparse_ffn import add_gpu_reduce, blockffn_functions, router_eps, static_tokens


def _dense_decode_body(bb: relax.BlockBuilder, name: str, dense: relax.Function, max_lanes: int) -> relax.Function:
    from blockffn.schedules import sparse_gpu

    x_ty, router_ty, _, up_ty, _ = [p.ty for p in dense.params]
    E, d = (int(v) for v in router_ty.shape)
    De = int(up_ty.shape[0]) // E
    dtype = str(x_ty.dtype)
    n = static_tokens(x_ty)
    tile = sparse_gpu.token_tile(n)
    f_down = sparse_gpu.down_kernel_gpu(E, De, d, dtype, max_lanes=max_lanes, token_tile=tile)
    # the same kernel as the sparse decode twin's (added once)
    gv_down = bb.add_func(f_down.without_attr("global_symbol"),
                          f"blockffn_sparse_down_e{E}_de{De}_d{d}_{dtype}_t{tile}")
    splits, gv_reduce = add_gpu_reduce(bb, E, De, d, dtype, None, False, max_lanes)
    idx = relax.const(np.arange(E, dtype="int32")[None, :])
    count = relax.const(np.array([E], dtype="int32"))
    params = [relax.Var(p.name, p.ty) for p in dense.params]
    x, w_router, w_norm, w_up, w_down = params
    with bb.function(name, params, private=True):
        with bb.dataflow():
            x2 = bb.emit(relax.op.reshape(x, relax.ShapeExpr([n, d])))
            a0 = bb.emit(relax.op.matmul(x2, relax.op.permute_dims(w_router)))
            gate = bb.emit(relax.op.nn.rms_norm(relax.op.nn.relu(a0), w_norm, axes=[-1], epsilon=router_eps(dense)))
            h = bb.emit(relax.op.nn.silu(relax.op.matmul(x2, relax.op.permute_dims(w_up))))
            h = bb.emit(relax.op.astype(relax.op.reshape(h, relax.ShapeExpr([n, E, De])), "float32")
                        * relax.op.astype(relax.op.reshape(gate, relax.ShapeExpr([n, E, 1])), "float32"))
            part = bb.emit(relax.call_tir(gv_down, [h, w_down, idx, count],
                                          relax.TensorType([splits, n, d], "float32")))
            y = bb.emit(relax.call_tir(gv_reduce, [part], relax.TensorType([n, d], dtype)))
            out = bb.emit_output(relax.op.reshape(y, x_ty.shape))
        gv = bb.emit_func_output(out)
    return bb.get()[gv]


@tvm.transform.module_pass(opt_level=0, name="LowerBlockFFNDenseDecodeGPU")
class LowerBlockFFNDenseDecodeGPU:
    """Rewrite, in place, the dense BlockFFN subroutines called with at most ``max_tokens`` static tokens.
    ``max_vector_lanes``: the widest vector type of the GPU language (8; Metal: 4)."""

    def __init__(self, max_tokens: int = 1, max_vector_lanes: int = 8):
        self.max_tokens = max_tokens
        self.max_lanes = max_vector_lanes
        self.rewritten: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        chosen = {gv: f for gv, f in blockffn_functions(mod).items()
                  if len(f.params) == 5 and (static_tokens(f.params[0].ty) or self.max_tokens + 1) <= self.max_tokens}
        if not chosen:
            return mod
        bb = relax.BlockBuilder(mod)
        bodies = {gv: _dense_decode_body(bb, gv.name_hint + "_splitk", f, self.max_lanes) for gv, f in chosen.items()}
        builder = relax.BlockBuilder(bb.get())
        for gv, body in bodies.items():
            builder.update_func(gv, body)
            self.rewritten.append(gv.name_hint)
        return relax.transform.DeadCodeElimination()(builder.get())  # drops the unreferenced "_splitk" builds
