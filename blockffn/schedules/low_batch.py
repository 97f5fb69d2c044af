"""VerifyRowsGEMV: the matmuls of speculative verification get dlight's low-row GEMV schedule, not the GEMM's.

Verification calls the model on k = 2…16 tokens through symbolic-length kernels that it shares with prefill, and
dlight gives a symbolic-row matmul its tiled GEMM schedule: right for a 2,048-token prefill, slow for 8 rows (few
blocks, each weight tile read by few threads), so verifying 8 tokens cost 4–8 decode steps on an H200 at the 2.8B
shape while reading a decode step's bytes.  This pass gives the Relax functions that only verification reaches
(``batch_verify*`` and the private functions only they call) their own copy of each such kernel, scheduled with
``LowBatchGEMV``: rows padded to a multiple of ``ROWS`` and each weight read once per ``ROWS`` rows.  Prefill keeps
the GEMM.

Why not one kernel that branches on the row count (mlc-llm's low-batch dispatch): on the 0.27 wheel a host-side
branch around kernels that synchronise threads fails ThreadSync ("Cannot insert syncs inside condition").  The
split by caller is known at compile time, so no branch is needed.

Runs right after fusion, before the backend's own dlight pass, on kernels not yet scheduled; kernels the GEMV rule
does not take (not a matmul, several symbolic dims, or an outer-axis reduction: 0.27's version leaves its input
padding unscheduled) stay shared.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

ROWS = 8  # rows per GEMV block: a verification of up to 8 tokens reads each weight once.  (More than 4 also keeps
#          the rule off outer-axis reductions, whose 0.27 version leaves the input padding outside any kernel.)
VERIFY_PREFIX = "batch_verify"


def _scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def _one_symbolic_dim(func: tirx.PrimFunc) -> bool:
    found = {v for p in func.params for dim in getattr(p.ty, "shape", None) or ()
             if not isinstance(dim, tirx.IntImm) for v in tirx.analysis.undefined_vars(dim)}
    return len(found) == 1


def _low_rows(func: tirx.PrimFunc, rows: int) -> tirx.PrimFunc | None:
    from tvm.s_tir import dlight as dl

    if not _one_symbolic_dim(func) or _scheduled(func):
        return None
    out = dl.ApplyDefaultSchedule(dl.gpu.LowBatchGEMV(rows))(tvm.IRModule({"main": func}))["main"]
    return out if _scheduled(out) else None


@visitor
class _Callees(PyExprVisitor):
    """GlobalVars a Relax function calls: Relax subroutines and call_tir kernels."""

    def __init__(self):
        super().__init__()
        self.relax, self.tir = set(), set()

    def visit_call_(self, call):  # noqa: N802
        if isinstance(call.op, tvm.ir.GlobalVar):
            self.relax.add(call.op)
        elif isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir":
            self.tir.add(call.args[0])
        super().visit_call_(call)


@mutator
class _Retarget(PyExprMutator):
    def __init__(self, mod, mapping):
        super().__init__(mod)
        self.mapping = mapping

    def visit_call_(self, call):  # noqa: N802
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir" and call.args[0] in self.mapping:
            return relax.Call(call.op, [self.mapping[call.args[0]], *call.args[1:]], call.attrs, call.ty_args)
        return call


def _verify_only(mod: tvm.IRModule) -> list:
    """Relax functions reached only from ``batch_verify*`` entry points (those included)."""
    funcs = {gv: f for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
    calls = {}
    for gv, f in funcs.items():
        v = _Callees()
        v.visit_expr(f)
        calls[gv] = v
    reached_by: dict = {gv: set() for gv in funcs}
    for entry, f in funcs.items():
        if f.attrs is None or "global_symbol" not in f.attrs:
            continue
        stack, seen = [entry], set()
        while stack:
            gv = stack.pop()
            if gv in seen or gv not in funcs:
                continue
            seen.add(gv)
            reached_by[gv].add(entry.name_hint)
            stack.extend(calls[gv].relax)
    return [gv for gv, entries in reached_by.items()
            if entries and all(e.startswith(VERIFY_PREFIX) for e in entries)]


def VerifyRowsGEMV(rows: int = ROWS):  # noqa: N802 - TVM pass naming
    @tvm.transform.module_pass(opt_level=0, name="VerifyRowsGEMV")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        verify = _verify_only(mod)
        if not verify:
            return mod
        mapping = {}
        for gv in verify:
            v = _Callees()
            v.visit_expr(mod[gv])
            for kernel in v.tir:
                if kernel in mapping or not isinstance(mod[kernel], tirx.PrimFunc):
                    continue
                low = _low_rows(mod[kernel], rows)
                if low is not None:
                    mapping[kernel] = None, low
        if not mapping:
            return mod
        bb = relax.BlockBuilder(mod)
        mapping = {k: bb.add_func(low, f"{k.name_hint}_rows{rows}") for k, (_, low) in mapping.items()}
        mod = bb.get()
        for gv in verify:
            mod[gv] = _Retarget(mod, mapping).visit_expr(mod[gv])
        return mod

    return _pass
