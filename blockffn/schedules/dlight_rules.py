"""Default TIR schedules for the dense work of GPU targets (dlight rules, first match wins).

Order follows mlc-llm: GEMV rules before Matmul so decode-time matrix-vector products get the GEMV schedule.
``dl.gpu.RMSNorm`` is left out on Metal (it emits float32x8, which Metal codegen rejects) and ``Fallback`` is
last so every remaining kernel gets threads bound (required on Metal/OpenCL).
"""

from __future__ import annotations


def gpu_schedule_passes(target) -> list:
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
    if target.kind.name != "metal":
        rules.append(dl.gpu.RMSNorm())
    rules.append(dl.gpu.Fallback())
    return [dl.ApplyDefaultSchedule(*rules)]


def schedule_passes(target) -> list:
    """Schedules for the target's dense kernels (none needed on CPU: LLVM codegen handles unscheduled loops)."""
    if target.kind.name == "llvm":
        return []
    return gpu_schedule_passes(target)
