"""A dlight rule that schedules the dense matmuls of CPU (llvm) builds.

Without it TVM leaves ``matmul`` kernels as plain scalar loop nests (10-100x slower than PyTorch).  The rule takes
any fused kernel whose one reduction block is a matmul against a weight ``W`` (static shape, indexed by the
output column ``j`` and the reduction ``k``), with injective prologues inlined and at most one injective epilogue:

* ``NT`` (``W[j, k]``, HF ``nn.Linear`` layout after FuseTransposeMatmul): each output is a dot product over the
  contiguous ``k``; ``k`` is split into vector lanes and ``rfactor``-ed so the lanes accumulate in a register
  vector, then reduced.  Parallel over output columns; a weight row stays in L1 while every token uses it.
* ``NN`` (``W[k, j]``, e.g. the expert down-projection stored ``[E*De, d]``): vectorised over a block of output
  columns, ``TB`` tokens at a time so each weight vector loaded serves ``TB`` tokens; accumulators are local.

Both are parallel over output columns (the weight is the big operand: every thread streams its own slice).
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target

logger = logging.getLogger(__name__)

NN_VECTORS = 4  # accumulator vectors per token in the NN kernel (independent FMA chains)
NN_TILE_BYTES = 64 * 1024  # weight tile (k rows x cols) kept in L2 while every token of the call uses it
NT_COLS = 4  # output columns computed together: independent FMA chains, one activation load serves all
TOKEN_BLOCK = 4  # tokens computed together when a call has several: each weight vector loaded serves all of them


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """SIMD lanes of ``dtype_bits`` on the target CPU (4 when LLVM cannot tell)."""
    from tvm.target import codegen

    try:
        bits = int(codegen.llvm_get_vector_width(target))
    except Exception as e:  # noqa: BLE001 - older LLVM / unknown cpu
        logger.warning(f"LLVM cannot tell the vector width of {target} ({type(e).__name__}); assuming 128 bits")
        bits = 128
    return max(4, bits // dtype_bits)


def _largest_divisor(n: int, at_most: int) -> int:
    for v in range(min(n, at_most), 0, -1):
        if n % v == 0:
            return v
    return 1


def _var_names(expr) -> set:
    return {v.name for v in collect_vars_used_in_prim_expr(expr)}


def _matmul_form(block: tirx.SBlock) -> tuple[str, int] | None:
    """("NT" | "NN", extent of j) when the block is C[..., j] += A[..., k] * W[j, k] or A[..., k] * W[k, j]."""
    spatial = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    reduce = [iv for iv in block.iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
    if len(reduce) != 1 or not spatial or len(block.reads) < 2:
        return None
    k, j = reduce[0].var.name, spatial[-1].var.name
    for read in block.reads:
        if len(read.region) != 2:
            continue
        first, last = (_var_names(r.min) for r in (read.region[0], read.region[-1]))
        if first == {j} and last == {k}:
            return "NT", spatial[-1].dom.extent
        if first == {k} and last == {j}:
            return "NN", spatial[-1].dom.extent
    return None


class DenseMatmulCPU(CPUScheduleRule):
    """Schedules NT / NN matmul kernels (plus fused epilogue) for llvm targets; other kernels are left alone."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None or not 1 <= len(infos) <= 2 or not infos[0].is_reduction():
            return None
        epilogue = infos[1].block_rv if len(infos) == 2 else None
        if len(infos) == 2 and not infos[1].is_injective():
            return None
        block = infos[0].block_rv
        if any(str(r.source.dtype) == "bfloat16" for r in list(sch.get(block).reads) + list(sch.get(block).writes)):
            return None  # LLVM lowers bf16 through uint16 storage, which rejects our vectorised bf16 stores
        form = _matmul_form(sch.get(block))
        if form is None or not isinstance(form[1], tirx.IntImm):
            return None
        kind, n_out = form[0], int(form[1])
        loops = sch.get_loops(block)
        *rows, j, k = loops
        if not rows:  # a single static row (decode): normalisation dropped its unit loop
            rows = [sch.add_unit_loop(j)]
        i = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        lanes = vector_lanes(target)
        rows_extent = sch.get(i).extent
        tokens = 1 if isinstance(rows_extent, tirx.IntImm) and int(rows_extent) < TOKEN_BLOCK else TOKEN_BLOCK
        if kind == "NT":
            self._nt(sch, block, epilogue, i, j, k, lanes, tokens)
        else:
            self._nn(sch, block, epilogue, i, j, k, _largest_divisor(n_out, NN_VECTORS * lanes), tokens)
        return sch

    @staticmethod
    def _nt(sch, block, epilogue, i, j, k, lanes, tokens):
        k_extent = sch.get(k).extent
        if not isinstance(k_extent, tirx.IntImm) or int(k_extent) % lanes:
            lanes = _largest_divisor(int(k_extent), lanes) if isinstance(k_extent, tirx.IntImm) else 1
        ko, ki = sch.split(k, [None, lanes])
        n_cols = int(sch.get(j).extent)
        jo, ji = sch.split(j, [None, _largest_divisor(n_cols, NT_COLS)])
        sch.reorder(jo, i, ko, ji, ki)
        # lanes innermost in the partial-sum buffer, so its loads/stores are whole vectors (kept in registers)
        rf = sch.rfactor(ki, factor_axis=len(sch.get(block).writes[0].region))
        # rf block: per token, NT_COLS columns at a time, each a lanes-wide partial sum (independent FMA chains;
        # one activation vector load serves all columns); the original block then sums the lanes
        rf_jo, rf_i, rf_ko, rf_ji, rf_ki = sch.get_loops(rf)
        rf_ii = None
        if tokens > 1:  # register tile: `tokens` x NT_COLS partial-sum vectors, each load serves a row or column
            rf_i, rf_ii = sch.split(rf_i, [None, tokens])
            sch.reorder(rf_i, rf_ko, rf_ii, rf_ji, rf_ki)
        sch.reverse_compute_at(block, rf_i)
        sch.set_scope(rf, 0, "local")
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, rf_i)
        sch.vectorize(rf_ki)
        sch.unroll(rf_ji)
        if rf_ii is not None:
            sch.unroll(rf_ii)
        sch.parallel(rf_jo)
        _vectorize_init(sch, sch.decompose_reduction(rf, rf_ko))

    @staticmethod
    def _nn(sch, block, epilogue, i, j, k, cols, tokens):
        k_extent = int(sch.get(k).extent)
        jo, ji = sch.split(j, [None, cols])
        ko, ki = sch.split(k, [None, _largest_divisor(k_extent, max(1, NN_TILE_BYTES // (4 * cols)))])
        if tokens > 1:  # `tokens` rows of accumulators: each weight vector loaded serves all of them
            io, ii = sch.split(i, [None, tokens])
            sch.reorder(jo, ko, io, ki, ii, ji)
            sch.unroll(ii)
        else:
            sch.reorder(jo, ko, i, ki, ji)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, jo)
        sch.vectorize(ji)
        sch.parallel(jo)
        _vectorize_init(sch, sch.decompose_reduction(block, ko))


def _vectorize_init(sch, init) -> None:
    """decompose_reduction copies the loops below the reduction; vectorise the init's innermost one."""
    loop = sch.get_loops(init)[-1]
    if sch.get(loop).kind != tirx.ForKind.VECTORIZED:
        sch.vectorize(loop)
