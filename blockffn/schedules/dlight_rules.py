"""Default TIR schedules for the dense work of each target (dlight rules, first match wins).

CPU: blockffn.schedules.dense_cpu.DenseMatmulCPU for the matmuls.  GPU: the order follows mlc-llm: GEMV rules before Matmul so decode-time matrix-vector products get the GEMV schedule.
``dl.gpu.RMSNorm`` is left out on Metal (it emits float32x8, which Metal codegen rejects) and ``Fallback`` is
last so every remaining kernel gets threads bound (required on Metal/OpenCL).
"""

from __future__ import annotations

import contextlib
import logging

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def metal_simdgroup_disabled(target):
    """Disable dl.gpu.Matmul's Metal simdgroup tensorization while lowering for Metal: on the 0.27 wheel its
    schedules fail to lower for our dynamic-length matmuls ("Cannot treat type ir.Call as type ir.Expr").  Matmul
    catches the error and falls back to its SIMT schedule.  TVM's own GPU legalize phase also runs dlight, so the
    whole pipeline runs inside this context."""
    if target.kind.name != "metal":
        yield
        return
    from tvm.s_tir.dlight.gpu import matmul as matmul_mod

    def _disabled(*_a, **_k):
        raise RuntimeError("simdgroup matmul disabled")

    original = matmul_mod.MetalMatmul.apply
    matmul_mod.MetalMatmul.apply = _disabled
    try:
        yield
    finally:
        matmul_mod.MetalMatmul.apply = original


@contextlib.contextmanager
def reduction_rules_guarded():
    """While lowering for a GPU: dlight's Reduction-family rules decline instead of raising on kernels they cannot
    normalise.  On the 0.27 wheel ``dl.gpu.Reduction`` raises a KeyError on some fused q4 dequantize-reductions,
    which would abort the whole build (TVM's own CUDA legalize phase runs these rules too, so the guard wraps the
    rule classes, not just our rule list); the next rule (at worst ``Fallback``) schedules the kernel instead."""
    from tvm.s_tir.dlight import gpu

    classes = [gpu.Reduction, gpu.GeneralReduction, gpu.LowBatchGEMV, gpu.GEMV]
    originals = {cls: cls.apply for cls in classes}

    def guard(original):
        def apply(self, func, target, tunable):
            try:
                return original(self, func, target, tunable)
            except (KeyError, IndexError) as e:
                logger.warning(f"dlight {type(self).__name__} could not schedule a kernel ({type(e).__name__}: "
                               f"{e}); the next rule schedules it")
                return None

        return apply

    for cls, original in originals.items():
        cls.apply = guard(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.apply = original


def _gpu_rules(target) -> list:
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
    if target.kind.name != "metal":
        rules.append(dl.gpu.RMSNorm())
    rules.append(dl.gpu.Fallback())
    return rules


def gpu_schedule_passes(target) -> list:
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(*_gpu_rules(target))]


def specialization_passes(target) -> list:
    """Passes that schedule kernels right after fusion, before the backend's own dlight pass: verification's
    matmuls get low-row GEMV copies (`blockffn.schedules.low_batch`).  GPUs except Metal (whose codegen the 0.27
    GEMV schedules do not always satisfy); none on CPUs."""
    if target.kind.name in ("llvm", "metal"):
        return []
    from blockffn.schedules.low_batch import VerifyRowsGEMV

    return [VerifyRowsGEMV()]


def schedule_passes(target) -> list:
    """Schedules for the target's dense kernels: on CPUs the fused q4 dequantize-matmul rule, then our matmul rule
    (the rest is left to LLVM); dlight on GPUs."""
    if target.kind.name == "llvm":
        from tvm.s_tir import dlight as dl

        from blockffn.schedules.dense_cpu import DenseMatmulCPU
        from blockffn.schedules.dense_q4_cpu import Q4MatmulCPU

        return [dl.ApplyDefaultSchedule(Q4MatmulCPU(), DenseMatmulCPU())]
    return gpu_schedule_passes(target)
