"""`blockffn-compile`: model folder -> Relax -> passes -> library -> MLC artifact folder (atomically)."""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path

from blockffn import __version__
from blockffn.artifacts import layout
from blockffn.artifacts.integrity import library_fields
from blockffn.artifacts.weights import param_records
from blockffn.compiler.resources import PhaseTimer
from blockffn.errors import BlockFFNError
from blockffn.model.checkpoint import TensorSource, load_model
from blockffn.outputs import atomic_output_dir
from blockffn.model.config import BlockFFNConfig
from blockffn.relax_passes.add_dense_twins import DENSE_SUFFIX as DENSE_TWIN_SUFFIX
from blockffn.targets import get_target

__all__ = ["CompileOptions", "PhaseTimer", "build_library", "compile_model", "load_compile_config"]


@dataclass
class CompileOptions:
    model_dir: Path
    target: str = "cpu"
    quantization: str = "q0f32"
    output: Path | None = None
    context_window: int | None = None
    prefill_chunk: int | None = None
    max_batch_size: int = 8
    overwrite: bool = False
    ffn: str = "auto"  # dense | sparse | auto
    arch: str | None = None  # CUDA SM override, e.g. sm_87
    draft: str | None = "auto"  # EAGLE draft head folder; auto: MODEL/draft when present; none: no draft
    debug_counts: bool = False  # also export *_with_stats (per-layer active-expert counts) for observability
    union_chunk: int = 16  # prefill: a union of active experts per this many consecutive tokens
    tune_trials: int = 0  # MetaSchedule trials per static-shape dense kernel (0: no tuning)
    tune_db: Path | None = None  # tuning database folder (default with tune_trials > 0: one per target in the cache)
    tune_max_kernels: int | None = None  # tune only the N costliest static kernels (tests; None: all)
    cuda_graph: bool = False  # CUDA: replay each step's kernels as CUDA graphs (elsewhere: only the inlining it needs)
    dump_ir: Path | None = None  # write the module after every pipeline phase here (TVMScript, one file per phase)


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


def draft_source(option: str | None, model_dir: Path) -> Path | None:
    """The draft head to build next to the model: ``auto`` = ``MODEL/draft`` if it exists, ``none`` = no draft."""
    if option in (None, "none"):
        return None
    if option == "auto":
        from blockffn.model.draft import bundled_draft_path

        path = bundled_draft_path(model_dir)
        return path if (path / "config.json").exists() else None
    path = Path(option)
    if not (path / "config.json").exists():
        raise BlockFFNError(f"--draft {option}: not a draft head folder (no config.json); train one with "
                            f"`blockffn train-draft`")
    return path


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def system_lib_prefix(model_name: str, quantization: str) -> str:
    """Symbol prefix of a system library: model name + quantization, [A-Za-z0-9_] only, not starting with a digit.
    The MLC apps load it as ``system://<prefix without the trailing _>``."""
    prefix = re.sub(r"[^A-Za-z0-9_]", "_", f"{model_name}_{quantization}_")
    return prefix if not prefix[0].isdigit() else "m_" + prefix


def kv_cache_bytes(cfg, context_window: int, dtype: str) -> int:
    """Bytes of K and V for one full-context sequence (what the paged cache needs per sequence)."""
    from blockffn.compiler.relax_model import cache_layout

    layout_ = cache_layout(cfg)
    elem = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    return 2 * cfg.num_hidden_layers * layout_["num_key_value_heads"] * layout_["head_dim"] * context_window * elem


@dataclass
class BuiltLibrary:
    """A compiled model library before it is written anywhere (``executable.export_library`` writes it)."""

    executable: object  # tvm.relax.VMExecutable
    functions: list[str]  # exported Relax functions
    named_params: list  # [(name, nn.Parameter)] in the library's parameter order
    metadata: dict  # the `_metadata` JSON (memory usage filled in by the pipeline)
    pass_names: list[str]


def build_library(opts: CompileOptions, cfg, preset, target, dtype: str, context: int, prefill_chunk: int,
                  prefix: str | None, timer: "PhaseTimer", scheme=None, tuning=None, log=print,
                  library: dict | None = None) -> BuiltLibrary:
    """Relax model -> blockffn pipeline (sparse lowering, schedules, metadata) -> VM executable for ``target``.
    ``library`` (see `library_manifest`) is embedded in ``_metadata`` so the library alone tells the runtime which
    weights it expects."""
    import tvm
    import tvm_ffi

    from blockffn.compiler import library_funcs
    from blockffn.compiler.relax_model import cache_layout, export_model

    if target.kind.name == "cuda":
        from blockffn.targets.cuda_build import configure_cuda_build

        configure_cuda_build(str(target.arch).removeprefix("sm_"))
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
                                                        graph_passes, tuning=tuning, log=log,
                                                        cuda_graph=opts.cuda_graph, dump_ir=opts.dump_ir)
    return BuiltLibrary(executable, functions, named_params, metadata, pass_names)


def lower_and_build(mod, metadata: dict, bounds: dict, preset, target, prefix: str | None, timer,
                    graph_passes=(), phase: str = "", tuning=None, log=print, cuda_graph: bool = False,
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
            tuning.tune(mod, target, log)

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
    with timer(phase + "build"):
        executable = relax.build(lowered, target, relax_pipeline=tvm.transform.Sequential([]),
                                 system_lib=preset.system_lib)
    return executable, functions, pass_names


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


def tuning_for(opts: CompileOptions, preset, target):
    """The compile's Tuning (None without --tune-trials / --tune-db), checked before anything is compiled."""
    if opts.tune_trials < 0:
        raise BlockFFNError(f"--tune-trials must be 0 or more, got {opts.tune_trials}")
    if opts.tune_trials == 0 and opts.tune_db is None:
        return None
    from blockffn.schedules import tuning

    if opts.tune_trials > 0:
        tuning.check_tunable(preset, target)
    db_dir = Path(opts.tune_db) if opts.tune_db is not None else tuning.default_db_dir(
        preset, preset.target_json(opts.arch))
    database = tuning.open_database(db_dir, create=opts.tune_trials > 0)
    tuning.check_database_target(database, target, db_dir)
    return tuning.Tuning(database, db_dir, opts.tune_trials, max_kernels=opts.tune_max_kernels)


def load_compile_config(model: str | Path) -> tuple[BlockFFNConfig, dict]:
    """What a library build reads: the model's config, never its weights.  ``model`` is a model folder
    (``config.json``), or an artifact folder / ``mlc-chat-config.json`` (MLC's compile input), whose context,
    prefill and batch sizes then become the defaults.  Returns (config, chat config or {})."""
    model = Path(model)
    if model.is_dir() and (model / "config.json").exists():
        return BlockFFNConfig.load(model / "config.json"), {}
    chat_path = model if model.name == layout.CHAT_CONFIG else model / layout.CHAT_CONFIG
    if not chat_path.is_file():
        raise BlockFFNError(f"{model}: no config.json or {layout.CHAT_CONFIG} (pass a model folder, an artifact "
                            f"folder or an {layout.CHAT_CONFIG})")
    try:
        chat = json.loads(chat_path.read_text())
    except json.JSONDecodeError as e:
        raise BlockFFNError(f"{chat_path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    return layout.config_from_chat_config(chat, chat_path), chat


def library_manifest(opts: CompileOptions, preset, dtype: str, scheme, lib_name: str, prefix: str | None,
                     context: int, prefill_chunk: int, tuning) -> dict:
    """The library's half of the manifest: target, quantization, weight layout, sizes, versions.  Embedded in
    ``_metadata``; an artifact folder's ``blockffn-manifest.json`` adds the weights' source and the draft."""
    import tvm
    import tvm_ffi

    from blockffn.compiler.convert_weight import weight_layout

    return {
        "format": layout.ARTIFACT_FORMAT, "blockffn_version": __version__,
        "target": {"name": preset.name, "tvm_target": preset.target_json(opts.arch),
                   "host_triple": preset.host_triple, "device": preset.device},
        "quantization": opts.quantization, "dtype": dtype,
        "quantization_scheme": scheme.manifest() if scheme is not None else None,
        "weight_layout": weight_layout(opts.quantization),
        "library": lib_name, "system_lib_prefix": prefix,
        "tuning": tuning.manifest() if tuning is not None else {"trials": 0, "database": None, "tuned_kernels": []},
        "versions": {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__, "blockffn": __version__},
        "context_window_size": context, "prefill_chunk_size": prefill_chunk, "max_batch_size": opts.max_batch_size,
        "cuda_graph": bool(opts.cuda_graph and preset.tvm_target(opts.arch).kind.name == "cuda"),
    }


def compile_model(opts: CompileOptions, log=print) -> dict:
    """Compile into an artifact folder (library + streamed weights + mlc-chat-config.json, the three steps of
    `convert-weight` / `gen-config` / library build in one), or, when ``opts.output`` names a library file
    (``.so``/``.tar``/``.dylib``), into that library alone (MLC's ``model_lib``; only the config is read) with a
    DEPLOY note beside it."""
    from blockffn.compiler.convert_weight import write_weights
    from blockffn.compiler.gen_config import write_chat_config
    from blockffn.compiler.library_output import check_library_output, library_exporter, write_library
    from blockffn.compiler.quantization import scheme_for

    preset = get_target(opts.target)
    dtype = layout.storage_dtype(opts.quantization)
    scheme = scheme_for(opts.quantization)
    model_dir = Path(opts.model_dir)
    cfg, chat = load_compile_config(model_dir)
    name = _safe_name(model_dir.resolve().name if model_dir.is_dir() else model_dir.resolve().parent.name)
    output = Path(opts.output) if opts.output else Path("dist") / f"{name}-{opts.quantization}-{preset.name}"
    suffix = check_library_output(preset, output)  # None: artifact folder
    lib_suffix = suffix or preset.lib_suffix
    fcompile = library_exporter(preset, lib_suffix)  # fails now, before compiling, if a toolchain is missing
    source = None
    if suffix is None:  # the weights are checked (headers: every name and shape) before anything is built
        if not (model_dir.is_dir() and (model_dir / "config.json").exists()):
            raise BlockFFNError(f"--output {output}: an artifact folder needs the checkpoint's weights, and "
                                f"{model_dir} is not a model folder; use --output NAME.so|.tar for the library alone")
        source = TensorSource(model_dir, cfg)
    context = opts.context_window or chat.get("context_window_size") or cfg.max_position_embeddings
    if not 0 < context <= cfg.max_position_embeddings:
        raise BlockFFNError(f"--context-window must be in 1..{cfg.max_position_embeddings} "
                            f"(the model's max_position_embeddings), got {context}")
    prefill_chunk = opts.prefill_chunk or chat.get("prefill_chunk_size") or min(context, 512)
    if not 0 < prefill_chunk <= context:
        raise BlockFFNError(f"--prefill-chunk must be in 1..{context}, got {prefill_chunk}")
    if opts.max_batch_size <= 0:
        raise BlockFFNError("--max-batch-size must be positive")
    lib_name = output.name if suffix else f"{name}-{opts.quantization}-{preset.name}{lib_suffix}"
    prefix = system_lib_prefix(name, opts.quantization) if preset.system_lib else None
    target = preset.tvm_target(opts.arch)
    tuning = tuning_for(opts, preset, target)  # fails now on an untunable target or a bad database
    timer = PhaseTimer(log)
    log(f"compiling {model_dir} for {preset.name} ({opts.quantization}) -> {output}")
    library = library_manifest(opts, preset, dtype, scheme, lib_name, prefix, context, prefill_chunk, tuning)

    def build():
        return build_library(opts, cfg, preset, target, dtype, context, prefill_chunk, prefix, timer, scheme,
                             tuning, log, library=library)

    from blockffn.artifacts.deploy import deploy_text

    if suffix:
        built = build()
        manifest = layout.manifest_from_metadata(built.metadata, lib_name)
        with timer("export_library"):
            note = write_library(built.executable, output, fcompile, deploy_text(preset, manifest, library_only=True),
                                 overwrite=opts.overwrite)
        return {"output": str(output), "library": lib_name, "deploy": str(note), "seconds": timer.times,
                "pipeline_seconds": timer.pipeline_phases,
                "peak_rss_mb": timer.peak_rss_mb, "param_bytes": 0,
                "kv_cache_bytes_per_sequence": kv_cache_bytes(cfg, context, dtype),
                "memory_usage": built.metadata["memory_usage"]}

    with atomic_output_dir(output, overwrite=opts.overwrite, kind="artifact") as tmp:
        built = build()
        with timer("export_library"):
            built.executable.export_library(str(tmp / lib_name), **({"fcompile": fcompile} if fcompile else {}))
        with timer("weights"):
            cache = write_weights(model_dir, cfg, opts.quantization, tmp, source)
        draft_entry = None
        draft_src = draft_source(opts.draft, model_dir)
        if draft_src is not None:
            from blockffn.artifacts.layout import DRAFT_FOLDER
            from blockffn.compiler.compile_draft import build_draft

            draft_lib = "draft-" + lib_name
            bounds = {"seq_len": prefill_chunk, "batch_size": opts.max_batch_size, "total_seq_len": context}

            def build_draft_library(module, meta, out_dir):  # not tuned: the draft is a small share of a step
                executable, fns, _ = lower_and_build(module, meta, bounds, preset, target,
                                                     None if prefix is None else prefix + "draft_", timer,
                                                     phase="draft ", dump_ir=opts.dump_ir)
                with timer("draft export_library"):
                    executable.export_library(str(out_dir / draft_lib), **({"fcompile": fcompile} if fcompile else {}))
                return draft_lib, fns

            # the draft predicts over the target's LM-head rows, so the (small) draft-carrying model is loaded
            draft_entry = build_draft(draft_src, load_model(model_dir, dtype="float32"), target, preset.name, dtype,
                                      tmp / DRAFT_FOLDER, build_draft_library, log, opts.max_batch_size, context)
        write_chat_config(cfg, opts.quantization, context, prefill_chunk, opts.max_batch_size, tmp)
        manifest = layout.manifest_from_metadata(built.metadata, lib_name)
        manifest.update(**library_fields(tmp / lib_name),
                        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        source=cache["metadata"]["blockffn"]["source"], draft=draft_entry,
                        compile_seconds=timer.times, peak_rss_mb=timer.peak_rss_mb)
        (tmp / layout.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "DEPLOY.md").write_text(deploy_text(preset, manifest))
    return {"output": str(output), "library": lib_name, "seconds": timer.times,
            "pipeline_seconds": timer.pipeline_phases, "peak_rss_mb": timer.peak_rss_mb,
            "param_bytes": sum(r["nbytes"] for r in param_records(cache)),
            "kv_cache_bytes_per_sequence": kv_cache_bytes(cfg, context, dtype),
            "memory_usage": built.metadata["memory_usage"]}
