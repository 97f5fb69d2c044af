"""CPU schedule for the fused dequantize-matmul kernels of q4 models (``blockffn.compiler.relax_quant``).

Unscheduled, LLVM would run the ``dequantize`` block first and materialise the whole full-precision weight in a
temporary buffer on every call.  This rule inlines it into the matmul, so each packed uint32 word is decoded in
the inner loop, and vectorises that loop over the word's 8 nibbles: the reduction axis is split by 8 and
rfactor-ed into an 8-lane accumulator (a register-sized local buffer), reduced once per output element.  Output
elements are parallel; elementwise epilogues FuseOps attached (residual add, scale) are inlined into the
write-back.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from blockffn.artifacts.q4 import PER_WORD

DEQUANTIZE_BLOCK = "dequantize"  # block names of the q4 matmul the compiler emits (blockffn.compiler.relax_quant)
MATMUL_BLOCK = "q4_matmul"  # and this rule recognises


def _block_named(sch: s_tir.Schedule, prefix: str):
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(blk).name_hint.startswith(prefix):
            return blk
    return None


class Q4MatmulCPU(CPUScheduleRule):
    """Schedules PrimFuncs holding a ``dequantize`` block that feeds a ``q4_matmul`` block; None for others."""

    def apply(self, func, target, tunable):  # noqa: ARG002 - dlight signature
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        try:
            sch.get_sblock("root")
        except Exception:  # noqa: BLE001 - a PrimFunc without a root block is not ours
            return None
        deq, mm = _block_named(sch, DEQUANTIZE_BLOCK), _block_named(sch, MATMUL_BLOCK)
        if deq is None or mm is None:
            return None
        sch.compute_inline(deq)
        *spatial, k = sch.get_loops(mm)
        extent = sch.get(k).extent
        if not isinstance(extent, tirx.IntImm) or int(extent) % PER_WORD:
            return None
        _, kv = sch.split(k, [None, PER_WORD])
        rf = sch.rfactor(kv, factor_axis=len(spatial))
        sch.set_scope(rf, 0, "local")
        out_loops = sch.get_loops(mm)[: len(spatial)]  # write-back nest: spatial loops + the 8 lanes
        sch.compute_at(rf, out_loops[-1])
        blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
        epilogues = [sch.get_sblock(b.name_hint) for b in blocks[blocks.index(sch.get(mm)) + 1:]]
        for blk in epilogues:  # elementwise consumers (sigmoid, multiply, residual add, cast) join the nest
            try:
                sch.reverse_compute_at(blk, out_loops[-1])
            except Exception:  # noqa: BLE001 - a non-elementwise epilogue stays a separate loop nest
                break
        sch.parallel(sch.fuse(*out_loops) if len(out_loops) > 1 else out_loops[0])
        lanes, words = sch.get_loops(rf)[1:]
        sch.reorder(words, lanes)
        sch.vectorize(lanes)
        sch.decompose_reduction(rf, words)
        return sch


def cpu_q4_schedule_passes() -> list:
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(Q4MatmulCPU())]
