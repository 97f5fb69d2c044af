"""`blockffn-compile`: model folder -> Relax -> passes -> library -> MLC artifact folder (atomically)."""

from __future__ import annotations

import logging
import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from blockffn import __version__
from blockffn.artifacts import layout
from blockffn.artifacts.integrity import library_fields
from blockffn.artifacts.weights import param_records
from blockffn.compiler.compile_plan import (  # noqa: F401 - re-exported: the compile API's names
    CompileOptions, CompilePlan, draft_source, kv_cache_bytes, load_compile_config, plan_compile, system_lib_prefix)
from blockffn.compiler.resources import PhaseTimer
from blockffn.errors import BlockFFNError
from blockffn.model.checkpoint import load_model
from blockffn.outputs import atomic_output_dir
from blockffn.relax_passes.add_dense_twins import DENSE_SUFFIX as DENSE_TWIN_SUFFIX

logger = logging.getLogger(__name__)

__all__ = ["CompileOptions", "PhaseTimer", "build_library", "compile_model", "load_compile_config"]


# A step's FFN touches only the union of its tokens' experts: over the whole call where the call has few tokens
# (decode, speculative verification), per chunk of --union-chunk consecutive tokens in prefill (a long prompt's
# union covers nearly every expert; a chunk's stays small because BlockFFN is trained for chunk-level sparsity).
CALL_UNION = ("decode", "batch_decode", "batch_verify", "decode_to_last_hidden_states",
              "batch_verify_to_last_hidden_states")
CHUNKED_UNION = ("prefill", "batch_prefill", "prefill_to_last_hidden_states")
AUTO_SPARSE = CALL_UNION + CHUNKED_UNION
STATS_SUFFIX = "_with_stats"  # debug twins that also return per-layer router counts (same FFN lowering)


def sparse_functions(policy: str, union_chunk: int = 16) -> dict[str, int | None]:
    """Sparse-lowered functions -> token chunk of their union (None: the whole call).

    ``auto`` and ``sparse`` lower the same functions; every one also keeps a dense twin.  Under ``auto`` the
    runtime times chunked-union prefill against the dense twin on the device and keeps the faster; ``sparse``
    always runs the sparse lowering."""
    if policy not in ("dense", "sparse", "auto"):
        raise BlockFFNError(f"unknown --ffn {policy!r}; use dense, sparse or auto")
    if union_chunk < 1:
        raise BlockFFNError(f"--union-chunk must be a positive number of tokens, got {union_chunk}")
    if policy == "dense":
        return {}
    return {f: (union_chunk if f in CHUNKED_UNION else None) for f in AUTO_SPARSE}


@dataclass
class BuiltLibrary:
    """A compiled model library before it is written anywhere (``executable.export_library`` writes it)."""

    executable: object  # tvm.relax.VMExecutable
    functions: list[str]  # exported Relax functions
    named_params: list  # [(name, nn.Parameter)] in the library's parameter order
    metadata: dict  # the `_metadata` JSON (memory usage filled in by the pipeline)
    pass_names: list[str]


def build_library(opts: CompileOptions, cfg, preset, target, dtype: str, context: int, prefill_chunk: int,
                  prefix: str | None, timer: "PhaseTimer", scheme=None, tuning=None,
                  library: dict | None = None) -> BuiltLibrary:
    """Relax model -> blockffn pipeline (sparse lowering, schedules, metadata) -> VM executable for ``target``.
    ``library`` (see `library_manifest`) is embedded in ``_metadata`` so the library alone tells the runtime which
    weights it expects."""
    import tvm
    import tvm_ffi

    from blockffn.compiler import library_funcs
    from blockffn.compiler.relax_model import cache_layout, export_model

    with timer("export"):
        mod, named_params, _ = export_model(cfg, dtype, target, scheme, opts.debug_counts)
        mod = library_funcs.add_logit_processors(mod, target)
        mod = library_funcs.add_softmax_with_temperature(mod)
        mod = library_funcs.add_alloc_embedding_tensor(mod, prefill_chunk, cfg.hidden_size, dtype)
    params_meta = [{"name": n, "shape": [int(s) for s in p.shape], "dtype": str(p.dtype), "preprocs": [],
                    "pipeline_stages": [0]} for n, p in named_params]
    kv_layout = cache_layout(cfg)
    metadata = {
        "model_type": "blockffn", "quantization": opts.quantization, "context_window_size": context,
        "prefill_chunk_size": prefill_chunk, "max_batch_size": opts.max_batch_size,
        "tensor_parallel_shards": 1, "pipeline_parallel_stages": 1, "sliding_window_size": -1,
        "attention_sink_size": -1, "kv_state_kind": "kv_cache",
        "kv_cache": {"num_hidden_layers": cfg.num_hidden_layers,
                     "num_attention_heads": cfg.num_attention_heads,
                     "num_key_value_heads": kv_layout["num_key_value_heads"], "head_dim": kv_layout["head_dim"]},
        "params": params_meta, "tvm_version": tvm.__version__, "tvm_ffi_version": tvm_ffi.__version__,
        "blockffn_version": __version__, "target": preset.name,
    }
    if library is not None:
        metadata[layout.LIBRARY_MANIFEST_KEY] = library
    bounds = {"seq_len": prefill_chunk, "batch_size": opts.max_batch_size, "total_seq_len": context}
    sparse_fns = sparse_functions(opts.ffn, opts.union_chunk)
    if opts.debug_counts:
        sparse_fns.update({f + STATS_SUFFIX: c for f, c in sparse_fns.items()
                           if any(f + STATS_SUFFIX == gv.name_hint for gv in mod.functions)})
    graph_passes = []
    if sparse_fns:
        from blockffn.relax_passes.add_dense_twins import AddDenseTwins
        from blockffn.relax_passes.lower_sparse_ffn import LowerBlockFFNSparse

        # dense twins (`decode_dense`, ...) let the runtime and `blockffn bench` run both FFN lowerings of the
        # same weights from one library
        graph_passes += [AddDenseTwins(list(sparse_fns)),
                         LowerBlockFFNSparse(sparse_fns, family=preset.kernel_family,
                                             max_vector_lanes=4 if target.kind.name == "metal" else 8)]
    if target.kind.name == "llvm" and dtype in ("float16", "bfloat16"):  # CPUs: half weights, fp32 sums
        from blockffn.relax_passes.accumulate_f32 import AccumulateMatmulF32

        graph_passes.append(AccumulateMatmulF32())
    if preset.kernel_family == "gpu":  # (q4 experts keep their dense body: the pass skips them)
        from blockffn.relax_passes.lower_dense_ffn import LowerBlockFFNDenseDecodeGPU

        graph_passes.append(LowerBlockFFNDenseDecodeGPU(max_vector_lanes=4 if target.kind.name == "metal" else 8))
    metadata["ffn"] = {"policy": opts.ffn, "sparse_functions": list(sparse_fns),
                       "union_chunk": {f: c for f, c in sparse_fns.items() if c is not None},
                       "dense_twins": {f: f + DENSE_TWIN_SUFFIX for f in sparse_fns}}
    executable, functions, pass_names = lower_and_build(mod, metadata, bounds, preset, target, prefix, timer,
                                                        graph_passes, tuning=tuning,
                                                        cuda_graph=opts.cuda_graph, dump_ir=opts.dump_ir)
    return BuiltLibrary(executable, functions, named_params, metadata, pass_names)


def lower_and_build(mod, metadata: dict, bounds: dict, preset, target, prefix: str | None, timer,
                    graph_passes=(), phase: str = "", tuning=None, cuda_graph: bool = False,
                    dump_ir: Path | None = None):
    """Our pipeline (graph passes, schedules, memory plan, `_metadata`) then relax.build; shared by the model
    and its draft head.  With ``tuning`` (blockffn.schedules.tuning.Tuning) the pipeline stops after legalization,
    the static dense kernels are tuned into its database, and the rest runs with the database applied first.
    Returns (executable, exported Relax functions, pass names).

    ``cuda_graph``: TVM's RewriteCUDAGraph captures the static stretches of each function as CUDA graphs; the
    per-layer subroutines are marked first so that no layer replays another's graph (see
    `blockffn.relax_passes.graph_safe_subroutines`).  Each pipeline phase's time lands in
    ``timer.pipeline_phases``; ``dump_ir`` receives the module after each phase."""
    import tvm
    from tvm import relax

    from blockffn.compiler.pipeline import build_pipeline
    from blockffn.schedules.dlight_rules import metal_simdgroup_disabled, reduction_rules_guarded, schedule_passes

    if cuda_graph:  # on any target, so that the CPU tests check the inlined module computes the same
        from blockffn.relax_passes.graph_safe_subroutines import InlineSubroutines

        graph_passes = list(graph_passes) + [InlineSubroutines]
    cuda_graph = cuda_graph and target.kind.name == "cuda"
    phase_seconds: dict = {}
    kw = dict(graph_passes=list(graph_passes), schedule_passes=schedule_passes(target), phase_seconds=phase_seconds,
              dump_dir=None if dump_ir is None else Path(dump_ir) / (phase.strip() or "model"))
    if prefix is not None:
        mod = mod.with_attr("system_lib_prefix", prefix)
    pass_names = []
    if tuning is not None:
        front, pass_names = build_pipeline(target, metadata, bounds, through="legalize", **kw)
        with timer(phase + "legalize"):
            with target:
                mod = front(mod)
        with timer(phase + "tune"):
            tuning.tune(mod, target)

        @tvm.transform.module_pass(opt_level=0, name="RecordTunedKernels")
        def record_tuning(m, _ctx):  # the applied kernels are known once the database pass ran
            if layout.LIBRARY_MANIFEST_KEY in metadata:
                metadata[layout.LIBRARY_MANIFEST_KEY]["tuning"] = tuning.manifest()
            return m

        kw.update(after="legalize", tuned_passes=[tuning.apply_pass(), record_tuning])
    pipeline, rest = build_pipeline(target, metadata, bounds, **kw)
    pass_names += rest
    if layout.LIBRARY_MANIFEST_KEY in metadata:
        metadata[layout.LIBRARY_MANIFEST_KEY]["passes"] = list(pass_names)
    with timer(phase + "passes"):
        with target, metal_simdgroup_disabled(target), reduction_rules_guarded(), _cuda_graph_context(cuda_graph):
            lowered = pipeline(mod)
    timer.pipeline_phases.update({f"{phase}{name}": s for name, s in phase_seconds.items()})
    functions = sorted(gv.name_hint for gv, f in lowered.functions.items()
                       if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs)
    with timer(phase + "build"), _device_compiler(target):
        executable = relax.build(lowered, target, relax_pipeline=tvm.transform.Sequential([]),
                                 system_lib=preset.system_lib)
    return executable, functions, pass_names


def _device_compiler(target):
    """nvcc for CUDA device code during the build (`blockffn.targets.cuda_build.cuda_build`); nothing otherwise."""
    import contextlib

    if target.kind.name != "cuda":
        return contextlib.nullcontext()
    from blockffn.targets.cuda_build import cuda_build

    return cuda_build(str(target.arch).removeprefix("sm_"))


def _cuda_graph_context(enabled: bool):
    """The current PassContext plus ``relax.backend.use_cuda_graph`` (a no-op context when not enabled)."""
    import contextlib

    import tvm

    if not enabled:
        return contextlib.nullcontext()
    current = tvm.transform.PassContext.current()
    config = {**dict(current.config), "relax.backend.use_cuda_graph": True}
    return tvm.transform.PassContext(opt_level=current.opt_level, config=config,
                                     instruments=list(current.instruments))


def _build(plan: CompilePlan, timer: PhaseTimer) -> BuiltLibrary:
    return build_library(plan.opts, plan.cfg, plan.preset, plan.target, plan.dtype, plan.context, plan.prefill_chunk,
                         plan.prefix, timer, plan.scheme, plan.tuning, library=plan.library)


def _report(plan: CompilePlan, timer: PhaseTimer, built: BuiltLibrary, **extra) -> dict:
    return {"output": str(plan.output), "library": plan.lib_name, "seconds": timer.times,
            "pipeline_seconds": timer.pipeline_phases, "peak_rss_mb": timer.peak_rss_mb,
            "kv_cache_bytes_per_sequence": kv_cache_bytes(plan.cfg, plan.context, plan.dtype),
            "memory_usage": built.metadata["memory_usage"], **extra}


def _export(plan: CompilePlan, executable, path: Path) -> None:
    executable.export_library(str(path), **({"fcompile": plan.fcompile} if plan.fcompile else {}))


def _write_library_only(plan: CompilePlan, timer: PhaseTimer) -> dict:
    """The library alone (MLC's ``model_lib``), with its DEPLOY note beside it."""
    from blockffn.artifacts.deploy import deploy_text
    from blockffn.compiler.library_output import write_library

    built = _build(plan, timer)
    manifest = layout.manifest_from_metadata(built.metadata, plan.lib_name)
    with timer("export_library"):
        note = write_library(built.executable, plan.output, plan.fcompile,
                             deploy_text(plan.preset, manifest, library_only=True), overwrite=plan.opts.overwrite)
    return _report(plan, timer, built, deploy=str(note), param_bytes=0)


def _build_draft(plan: CompilePlan, timer: PhaseTimer, out: Path) -> dict | None:
    """The EAGLE draft head's library and weights into ``out/draft`` (its manifest entry), if the model has one."""
    draft_src = draft_source(plan.opts.draft, plan.model_dir)
    if draft_src is None:
        return None
    from blockffn.artifacts.layout import DRAFT_FOLDER
    from blockffn.compiler.compile_draft import build_draft

    opts, draft_lib = plan.opts, "draft-" + plan.lib_name
    bounds = {"seq_len": plan.prefill_chunk, "batch_size": opts.max_batch_size, "total_seq_len": plan.context}

    def build_draft_library(module, meta, out_dir):  # not tuned: the draft is a small share of a step
        executable, fns, _ = lower_and_build(module, meta, bounds, plan.preset, plan.target,
                                             None if plan.prefix is None else plan.prefix + "draft_", timer,
                                             phase="draft ", dump_ir=opts.dump_ir)
        with timer("draft export_library"):
            _export(plan, executable, out_dir / draft_lib)
        return draft_lib, fns

    # the draft predicts over the target's LM-head rows, so the (small) draft-carrying model is loaded
    return build_draft(draft_src, load_model(plan.model_dir, dtype="float32"), plan.target, plan.preset.name,
                       plan.dtype, out / DRAFT_FOLDER, build_draft_library, opts.max_batch_size, plan.context)


def _write_artifact(plan: CompilePlan, timer: PhaseTimer) -> dict:
    """Library + streamed weights + draft + mlc-chat-config.json + manifest, built in a temp folder and renamed
    into place only when complete."""
    from blockffn.artifacts.deploy import deploy_text
    from blockffn.compiler.convert_weight import write_weights
    from blockffn.compiler.gen_config import write_chat_config

    opts = plan.opts
    with atomic_output_dir(plan.output, overwrite=opts.overwrite, kind="artifact") as tmp:
        built = _build(plan, timer)
        with timer("export_library"):
            _export(plan, built.executable, tmp / plan.lib_name)
        with timer("weights"):
            cache = write_weights(plan.model_dir, plan.cfg, opts.quantization, tmp, plan.source)
        draft_entry = _build_draft(plan, timer, tmp)
        write_chat_config(plan.cfg, opts.quantization, plan.context, plan.prefill_chunk, opts.max_batch_size, tmp)
        manifest = layout.manifest_from_metadata(built.metadata, plan.lib_name)
        manifest.update(**library_fields(tmp / plan.lib_name),
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        source=cache["metadata"]["blockffn"]["source"], draft=draft_entry,
                        compile_seconds=timer.times, pipeline_seconds=timer.pipeline_phases,
                        peak_rss_mb=timer.peak_rss_mb)
        (tmp / layout.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "DEPLOY.md").write_text(deploy_text(plan.preset, manifest))
    return _report(plan, timer, built, param_bytes=sum(r["nbytes"] for r in param_records(cache)))


def compile_model(opts: CompileOptions) -> dict:
    """Compile into an artifact folder (library + streamed weights + mlc-chat-config.json, the three steps of
    `convert-weight` / `gen-config` / library build in one), or, when ``opts.output`` names a library file
    (``.so``/``.tar``/``.dylib``), into that library alone (MLC's ``model_lib``; only the config is read) with a
    DEPLOY note beside it.  The plan (every check) comes first; then the build and the writing steps."""
    plan = plan_compile(opts)
    timer = PhaseTimer()
    logger.info(f"compiling {plan.model_dir} for {plan.preset.name} ({opts.quantization}) -> {plan.output}")
    return (_write_library_only if plan.library_only else _write_artifact)(plan, timer)
