"""What a compile will do, decided up front: `plan_compile` checks the options against the model, the target and
its toolchain and fixes every name and size (`CompilePlan`), so user errors surface before minutes of compiling;
`blockffn.compiler.compile` then carries the plan out."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from blockffn import __version__
from blockffn.artifacts import layout
from blockffn.errors import BlockFFNError
from blockffn.model.tensor_source import TensorSource
from blockffn.model.config import BlockFFNConfig
from blockffn.targets import get_target


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


@dataclass
class CompilePlan:
    """Everything a compile decided before building: names, sizes, target, toolchain, tuning, the manifest's
    library half.  Made (and every user error raised) before anything is compiled or written."""

    opts: CompileOptions
    preset: object  # blockffn.targets.TargetPreset
    target: object  # tvm.target.Target
    cfg: BlockFFNConfig
    model_dir: Path
    output: Path
    library_only: bool  # output names a library file (.so/.tar/.dylib), not an artifact folder
    lib_name: str
    fcompile: object  # the toolchain's exporter (None: TVM's default)
    source: object  # TensorSource of the checkpoint's weights (None for a library alone)
    dtype: str
    scheme: object  # q4 GroupQuant or None
    context: int
    prefill_chunk: int
    prefix: str | None  # system-library symbol prefix
    tuning: object  # blockffn.schedules.tuning.Tuning or None
    library: dict  # the manifest's library half, embedded in `_metadata`


def plan_compile(opts: CompileOptions) -> CompilePlan:
    """Check the options against the model and the target and fix every name and size of the compile."""
    from blockffn.compiler.library_output import check_library_output, library_exporter
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
    library = library_manifest(opts, preset, dtype, scheme, lib_name, prefix, context, prefill_chunk, tuning)
    return CompilePlan(opts, preset, target, cfg, model_dir, output, suffix is not None, lib_name, fcompile, source,
                       dtype, scheme, context, prefill_chunk, prefix, tuning, library)
