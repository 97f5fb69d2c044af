"""The blockffn Relax pipeline: our passes between TVM's per-target phases, plus the MLC metadata.

Order (each phase a list so the artifact manifest can record every pass by name):
  attach    - variable upper bounds (drive static memory planning)
  graph     - blockffn Relax passes (sparse lowering etc., supplied by the caller) + FuseTransposeMatmul
  dispatch  - TVM library dispatch (sampling, sort/scan)
  legalize  - LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR
  schedule  - schedules from a tuning database (``tuned_passes``), then low-row specializations of symbolic-row
              matmuls (GPUs), then the backend's own default schedules (TVM's
              GPU legalize lists end with dlight), then the caller's (our dlight rules); each skips what an
              earlier one scheduled
  lower     - dataflow lowering, StaticPlanBlockMemory, then AttachMetadata (memory usage of every function,
              `_metadata`), then the remaining VM lowering.

Each phase runs as one named step that records its wall time (``phase_seconds``) and, with ``dump_dir``, writes
the module after it as TVMScript (``DIR/NN-<phase>.py``: what `blockffn-compile --dump-ir DIR` leaves to read).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprVisitor, visitor


def attach_variable_bounds(bounds: dict[str, int]) -> tvm.transform.Pass:
    """Upper bounds of symbolic dims (seq_len, batch_size, …) on every Relax function, as MLC does."""

    @tvm.transform.module_pass(opt_level=0, name="AttachVariableBounds")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                func = func.with_attr("tir_var_upper_bound", bounds)
                func = func.with_attr("tir_non_negative_var", list(bounds))
                mod[gv] = func
        return mod

    return _pass


@visitor
class _AllocBytes(PyExprVisitor):
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def visit_call_(self, call):  # noqa: N802 - TVM visitor naming
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.memory.alloc_storage":
            size = call.args[0]
            if isinstance(size, relax.ShapeExpr) and all(isinstance(v, tvm.tirx.IntImm) for v in size.values):
                n = 1
                for v in size.values:
                    n *= int(v)
                self.bytes += n
        super().visit_call_(call)


def memory_usage(mod: tvm.IRModule) -> dict[str, int]:
    """Bytes of statically planned storage per Relax function (after StaticPlanBlockMemory)."""
    usage = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and func.attrs is not None and "global_symbol" in func.attrs:
            v = _AllocBytes()
            v.visit_expr(func)
            usage[gv.name_hint] = v.bytes
        elif isinstance(func, relax.Function):
            v = _AllocBytes()
            v.visit_expr(func)
            usage[gv.name_hint] = v.bytes
    return usage


def attach_metadata(metadata: dict) -> tvm.transform.Pass:
    """Adds `_metadata() -> str` (the MLC JSON) with ``memory_usage`` filled from the planned module."""

    @tvm.transform.module_pass(opt_level=0, name="AttachMetadataWithMemoryUsage")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        metadata["memory_usage"] = memory_usage(mod)
        metadata["functions"] = sorted(["_metadata"] + [gv.name_hint for gv, f in mod.functions.items()
                                                        if isinstance(f, relax.Function) and f.attrs is not None
                                                        and "global_symbol" in f.attrs])
        func = relax.Function([], tvm.ir.StringImm(json.dumps(metadata, sort_keys=True)), is_pure=True)
        mod["_metadata"] = func.with_attr("global_symbol", "_metadata")
        return mod

    return _pass


def fuse_transpose_matmul() -> tvm.transform.Pass:
    return relax.transform.FuseTransposeMatmul()


def _backend_pipeline(target: tvm.target.Target):
    """TVM's per-backend phase lists.  Imported from the backend modules directly: the 0.27 wheel's
    ``tvm.relax.pipeline.dataflow_lower_passes`` fails (the backend packages do not re-export it)."""
    import importlib

    kind = target.kind.name
    name = {"llvm": "cpu_generic", "cuda": "cuda"}.get(kind, "gpu_generic")
    return importlib.import_module(f"tvm.relax.backend.{name}.pipeline")


PHASES = ("attach", "graph", "dispatch", "legalize", "schedule", "lower")


def _phase(index: int, name: str, passes: list, phase_seconds: dict, dump_dir: Path | None):
    """One phase as a single pass: its passes in order, timed, the result optionally dumped."""
    sequence = tvm.transform.Sequential(passes, name=name)

    @tvm.transform.module_pass(opt_level=0, name=f"phase_{name}")
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        t0 = time.perf_counter()
        mod = sequence(mod)
        phase_seconds[name] = round(time.perf_counter() - t0, 3)
        if dump_dir is not None:
            dump_dir.mkdir(parents=True, exist_ok=True)
            (dump_dir / f"{index:02d}-{name}.py").write_text(mod.script(show_meta=False))
        return mod

    return _run


def build_pipeline(target: tvm.target.Target, metadata: dict, bounds: dict[str, int],
                   graph_passes: list | None = None, schedule_passes: list | None = None, through: str = "lower",
                   after: str | None = None, tuned_passes: list | None = None, phase_seconds: dict | None = None,
                   dump_dir: str | Path | None = None):
    """Returns (pipeline pass, [pass names in order]).  ``through`` stops after that phase (e.g. "schedule": the
    scheduled Relax + TIR module, before VM lowering, which tests run kernel by kernel); ``after`` starts after
    that phase (e.g. "legalize": continue a module that was tuned after legalization).  ``phase_seconds`` (a dict)
    receives each phase's wall time; ``dump_dir`` the module after each phase."""
    from blockffn.schedules.dlight_rules import specialization_passes

    P = _backend_pipeline(target)
    legalize = P.legalize_passes(target)
    fused = next(i for i, p in enumerate(legalize) if p.info.name == "FuseTIR") + 1
    phases = [
        [attach_variable_bounds(bounds)],
        list(graph_passes or []) + [fuse_transpose_matmul()],
        P.library_dispatch_passes(target),
        legalize[:fused],
        list(tuned_passes or []) + specialization_passes(target) + legalize[fused:] + list(schedule_passes or []),
        P.dataflow_lower_passes(target),
    ]
    finalize = P.finalize_passes(target)
    plan_idx = next(i for i, p in enumerate(finalize) if p.info.name == "StaticPlanBlockMemory")
    phases[-1] = phases[-1] + finalize[: plan_idx + 1] + [attach_metadata(metadata)] + finalize[plan_idx + 1:]
    first = PHASES.index(after) + 1 if after else 0
    last = PHASES.index(through) + 1
    seconds = phase_seconds if phase_seconds is not None else {}
    dump = None if dump_dir is None else Path(dump_dir)
    steps = [_phase(i, PHASES[i], phases[i], seconds, dump) for i in range(first, last)]

    @tvm.transform.module_pass(opt_level=0, name="blockffn_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            return tvm.transform.Sequential(steps)(mod)

    return _pipeline, [p.info.name for phase in phases[first:last] for p in phase]
