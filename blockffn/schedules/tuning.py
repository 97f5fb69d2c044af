"""MetaSchedule tuning of the static-shape dense kernels, and applying a tuning database while compiling.

Our dlight rules schedule every kernel in milliseconds without measuring anything.  The kernels whose shapes are
all constants (decode-time projections, router, lm-head, the ``*_dense`` FFN twins) run on every token and have one
shape only, so they can be measured once and the best schedule reused from a database; kernels sized by
``seq_len``/``batch_size`` cannot be measured for every size and keep the rules.  Tuning runs the kernels, so it
needs the target's device on this machine; a database tuned on the device can be applied to any build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections import Counter
from pathlib import Path

from blockffn.errors import BlockFFNError

logger = logging.getLogger(__name__)

DB_FILES = ("database_workload.json", "database_tuning_record.json")  # what ms.database.JSONDatabase writes
TUNING_PACKAGES = ("psutil", "cloudpickle", "xgboost")  # MetaSchedule's runner, builder pool and cost model
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def _is_static(func) -> bool:
    """Every parameter is a buffer of constant shape (no seq_len / batch_size, no scalar arguments)."""
    from tvm import tirx

    types = [p.ty for p in func.params]  # 0.27: buffer parameters carry a BufferType (there is no buffer_map)
    return all(isinstance(t, tirx.BufferType) and all(isinstance(d, tirx.IntImm) for d in t.shape) for t in types)


def _has_reduction(func) -> bool:
    import tvm
    from tvm.s_tir.analysis import find_anchor_sblock

    return find_anchor_sblock(tvm.IRModule({"main": func})) is not None


def static_dense_kernels(mod) -> dict[str, object]:
    """{name: PrimFunc} of the kernels worth tuning in a legalized, fused module: constant shapes, not scheduled
    yet (our hand-written sparse kernels carry ``tirx.is_scheduled``), with a reduction (matmul, norm)."""
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and not (f.attrs is not None and f.attrs.get("tirx.is_scheduled", False))
            and _is_static(f) and _has_reduction(f)}


def _tasks(kernels: dict) -> dict[str, tuple]:
    """{name: (workload module, weight)}, one per distinct kernel (layers share kernels), normalised exactly as
    MetaScheduleApplyDatabase normalises a kernel when it looks it up."""
    import tvm
    from tvm_ffi import structural_hash

    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")
    tasks, by_hash = {}, {}
    for name, func in kernels.items():
        mod = normalize(func)
        first = by_hash.setdefault(structural_hash(mod), name)
        tasks[first] = (mod, tasks[first][1] + 1 if first in tasks else 1)
    return tasks


def _measurable(target):
    """The target MetaSchedule measures with: its CPU mutators need ``num-cores`` (physical cores here)."""
    import psutil
    import tvm

    if target.kind.name != "llvm" or "num-cores" in target.attrs:
        return target
    return tvm.target.Target({**target.export(), "num-cores": psutil.cpu_count(logical=False) or 1})


def _local_device_missing(preset, target) -> str | None:
    """Why kernels for ``target`` cannot be measured here (None: they can)."""
    import tvm

    host = target.host if target.kind.name != "llvm" else target
    triple = str(host.attrs.get("mtriple", "")) if host is not None else ""
    here = _MACHINES.get(platform.machine().lower(), platform.machine())
    if triple and _MACHINES.get(triple.split("-")[0], triple.split("-")[0]) != here:
        return f"{preset.name} runs on {triple.split('-')[0]}, this machine is {here}"
    if target.kind.name == "llvm":
        return None
    if target.kind.name == "cuda":
        return None if tvm.cuda().exist else f"{preset.name}: no CUDA device here"
    return f"{preset.name}: MetaSchedule tunes llvm and cuda targets only, not {target.kind.name}"


def check_tunable(preset, target) -> None:
    """Fail before compiling when ``--tune-trials`` cannot measure kernels for this target here."""
    why = _local_device_missing(preset, target)
    if why:
        raise BlockFFNError(f"--tune-trials needs the target's device on this machine ({why}); tune on the device "
                            f"and pass its database with --tune-db DIR")
    import importlib.util

    missing = [p for p in TUNING_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        pip = " ".join("xgboost-cpu" if p == "xgboost" else p for p in missing)
        raise BlockFFNError(f"--tune-trials needs {', '.join(missing)} (MetaSchedule); pip install {pip}")


def default_db_dir(preset, target_json: dict) -> Path:
    """The per-user database of a target: one folder per preset and exact target (e.g. the host's -mcpu)."""
    from blockffn import cache_dir

    key = hashlib.sha256(json.dumps(target_json, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "tuning" / f"{preset.name}-{key}"


def open_database(path: Path, create: bool):
    """The MetaSchedule JSON database in folder ``path``; ``create`` makes an empty one when there is none."""
    from tvm.s_tir import meta_schedule as ms

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BlockFFNError(f"--tune-db {path}: not a folder (a MetaSchedule database is a folder with "
                            f"{' and '.join(DB_FILES)})")
    if not create and not (path / DB_FILES[0]).is_file():
        raise BlockFFNError(f"--tune-db {path}: no MetaSchedule database there ({DB_FILES[0]} missing); "
                            f"create one with --tune-trials N")
    try:
        path.mkdir(parents=True, exist_ok=True)
        return ms.database.JSONDatabase(work_dir=str(path), allow_missing=create)
    except Exception as e:  # noqa: BLE001 - TVM raises its own errors for unreadable JSON
        first = str(e).strip().splitlines()
        raise BlockFFNError(f"--tune-db {path}: not a readable MetaSchedule database "
                            f"({first[-1] if first else type(e).__name__})") from None


def check_database_target(db, target, path: Path) -> None:
    """A database tuned for another kind of device would give e.g. CPU loop nests to a GPU build."""
    kinds = {rec.target.kind.name for rec in db.get_all_tuning_records()}
    if kinds - {target.kind.name}:
        raise BlockFFNError(f"--tune-db {path} was tuned for {', '.join(sorted(kinds))}, not "
                            f"{target.kind.name}; use a database tuned for this target")


class Tuning:
    """One compile's tuning: measure the static dense kernels into the database (``trials`` per kernel, kernels
    with that many records already are reused), then hand the schedule phase a pass that applies the database."""

    def __init__(self, database, db_dir: Path, trials: int, seed: int = 0, max_kernels: int | None = None):
        self.database, self.db_dir, self.trials, self.seed = database, Path(db_dir), trials, seed
        self.max_kernels = max_kernels  # tune only the costliest kernels (flops x uses); tests keep tuning short
        self.applied: list[str] = []  # kernels that got their schedule from the database

    def tune(self, mod, target) -> None:
        """Tune the kernels of ``mod`` (legalized, fused) that the database lacks; no-op with 0 trials."""
        if self.trials <= 0:
            logger.info(f"  tuning database {self.db_dir} (applied only, no tuning)")
            return
        from tvm.s_tir import meta_schedule as ms
        from tvm_ffi import structural_hash

        tasks = _tasks(static_dense_kernels(mod))
        if self.max_kernels is not None:
            from tvm.s_tir.analysis import estimate_tir_flops

            costliest = sorted(tasks, key=lambda n: -estimate_tir_flops(tasks[n][0]) * tasks[n][1])
            tasks = {n: tasks[n] for n in costliest[: self.max_kernels]}
        records = Counter(structural_hash(r.workload.mod) for r in self.database.get_all_tuning_records())
        # a kernel counts as tuned with `trials` records, or once it got a `trials` budget before (a small search
        # space, or failed builds, can leave it with fewer records: re-tuning it would only repeat the search)
        budgets = self._budgets()
        todo = {name: task for name, task in tasks.items()
                if max(records[h := structural_hash(task[0])], budgets.get(str(h), 0)) < self.trials}
        logger.info(f"  tuning {len(todo)} of {len(tasks)} static dense kernels ({len(tasks) - len(todo)} from the "
            f"database), {self.trials} trials each -> {self.db_dir}")
        if not todo:
            return
        t0 = time.perf_counter()
        tune_target = _measurable(target)
        with _quiet_console():
            loggers = ms.logging.get_loggers_from_work_dir(str(self.db_dir), list(todo))
            seeds = ms.utils.fork_seed(self.seed, n=len(todo))
            contexts = [ms.TuneContext(mod=m, target=tune_target, space_generator="post-order-apply",
                                       search_strategy="evolutionary", task_name=name, logger=logger,
                                       rand_state=seed, num_threads="physical").clone()
                        for (name, (m, _)), logger, seed in zip(todo.items(), loggers, seeds)]
            ms.tune_tasks(tasks=contexts, task_weights=[float(w) for _, w in todo.values()],
                          work_dir=str(self.db_dir), max_trials_global=self.trials * len(contexts),
                          max_trials_per_task=self.trials, num_trials_per_iter=min(64, self.trials),
                          builder=ms.builder.LocalBuilder(max_workers=contexts[0].num_threads,
                                                          f_build=_build_candidate),
                          database=self.database)
        budgets.update({str(structural_hash(m)): self.trials for m, _ in todo.values()})
        self._save_budgets(budgets)
        logger.info(f"  tuned {len(todo)} kernels in {time.perf_counter() - t0:.1f} s")

    BUDGETS = "blockffn-trials.json"  # kernel workload hash -> trials it was given (beside MetaSchedule's files)

    def _budgets(self) -> dict:
        try:
            return {str(k): int(v) for k, v in json.loads((self.db_dir / self.BUDGETS).read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}  # none yet, or unreadable: count records only

    def _save_budgets(self, budgets: dict) -> None:
        tmp = self.db_dir / (self.BUDGETS + ".tmp")
        tmp.write_text(json.dumps(budgets, indent=1))
        tmp.replace(self.db_dir / self.BUDGETS)

    def apply_pass(self):
        """Relax pass: replace each kernel the database has a record for by its best schedule (marked scheduled,
        so the dlight rules after it leave it alone) and note its name in ``applied``."""
        import tvm
        from tvm import relax, tirx

        def unscheduled(mod):
            return {gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)
                    and not (f.attrs is not None and f.attrs.get("tirx.is_scheduled", False))}

        @tvm.transform.module_pass(opt_level=0, name="ApplyTuningDatabase")
        def _pass(mod, _ctx):
            before = unscheduled(mod)
            with self.database:  # the C++ pass reads the current database and target when it is created
                mod = relax.transform.MetaScheduleApplyDatabase()(mod)
            self.applied = sorted(before - unscheduled(mod))
            return mod

        return _pass

    def manifest(self) -> dict:
        return {"trials": self.trials, "database": str(self.db_dir), "tuned_kernels": self.applied}


def _build_candidate(mod, target, _params):
    """MetaSchedule's default build without its ``import tvm.s_tir.tensor_intrin``: on the 0.27 wheel that import
    takes ~30 s, the builder's whole per-build timeout, and the builder starts fresh worker processes for every
    batch, so every trial failed ("Timeout, killed after 30.0 seconds").  Candidates arrive already scheduled
    (tensorized ones with the intrinsic's body in place), so building needs no intrinsic registry."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


class _quiet_console:
    """MetaSchedule prints a table per round on stdout; keep the compile log to our own lines (per-task logs
    stay in DB/logs)."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("tvm.s_tir.meta_schedule")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)

    def __exit__(self, *_):
        self.logger.setLevel(self.level)
        return False
