"""AccumulateMatmulF32: half-precision matmuls accumulate in fp32 and cast the result back.

``nn.Linear`` in fp16 emits ``matmul(x, W)`` with an fp16 output, so the reduction itself runs in fp16.  On CPUs
without fp16 arithmetic (x86 before AVX512-FP16) LLVM then converts every partial sum to float and back, one
scalar at a time: an f16 model reads half the bytes of an f32 one and still decodes slower.  Rewritten as
``astype(matmul(x, W, out_dtype="float32"), "float16")`` the kernel loads fp16 vectors, widens them in registers
(F16C ``vcvtph2ps``; native on aarch64) and keeps fp32 vector accumulators; after fusion the cast is the matmul's
epilogue, which `blockffn.schedules.dense_cpu.DenseMatmulCPU` schedules with it.  It is also the more accurate sum.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

HALF = ("float16", "bfloat16")


@mutator
class _Widen(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):  # noqa: N802 - TVM visitor naming
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return call
        dtype = str(call.ty.dtype) if hasattr(call.ty, "dtype") else ""
        if dtype not in HALF or any(str(a.ty.dtype) not in HALF for a in call.args):
            return call
        self.count += 1
        return relax.op.astype(relax.op.matmul(call.args[0], call.args[1], out_dtype="float32"), dtype)


@tvm.transform.module_pass(opt_level=0, name="AccumulateMatmulF32")
class AccumulateMatmulF32:
    """Rewrite every half-precision Relax ``matmul`` of the module (``rewritten``: how many, per function)."""

    def __init__(self):
        self.rewritten: dict[str, int] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        builder = relax.BlockBuilder(mod)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                widen = _Widen(mod)
                new = widen.visit_expr(func)
                if widen.count:
                    builder.update_func(gv, new)
                    self.rewritten[gv.name_hint] = widen.count
        return builder.get()
