"""Build an EAGLE draft head into ``ARTIFACT/draft``: its own library (same target as the model's), its weights
(the draft's tensors plus the target head rows it predicts over), and a manifest tying it to the target.

Called by `blockffn.compiler.compile.compile_model` inside the artifact's temporary folder, so a failed draft build
leaves no artifact behind.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from blockffn import __version__
from blockffn.artifacts.integrity import library_fields
from blockffn.artifacts.layout import DRAFT_FORMAT, DRAFT_MANIFEST
from blockffn.artifacts.weights import to_numpy, write_tensor_cache
from blockffn.errors import BlockFFNError

logger = logging.getLogger(__name__)


def draft_head_rows(draft, target_model):
    """The target LM-head rows the draft predicts over (all rows, or ``d2t`` for a reduced vocabulary)."""
    head = target_model.lm_head.weight
    return head if draft.d2t is None else head[draft.d2t]


def build_draft(draft_dir: Path, target_model, target, target_name: str, dtype: str, out: Path, build_library,
                max_batch_size: int, context_window: int) -> dict:
    """Compile ``draft_dir`` for ``target`` into ``out`` (created).  ``build_library(mod, metadata, name, out)``
    is the model's own build step (pipeline, relax.build, export with the target's linker); returns the manifest
    entry."""
    from blockffn.compiler.relax_draft import export_draft
    from blockffn.model.draft import load_draft

    draft = load_draft(draft_dir, target=target_model)
    cfg = draft.config
    out.mkdir(parents=True)
    mod, named_params = export_draft(cfg, dtype, target)
    state = {k: v for k, v in draft.state_dict().items() if k != "d2t"}
    state["lm_head.weight"] = draft_head_rows(draft, target_model)
    tensors = {}
    for name, param in named_params:
        if name not in state:
            raise BlockFFNError(f"internal: the draft library expects a tensor {name!r} that {draft_dir} lacks")
        tensors[name] = to_numpy(state[name], dtype)
        if list(tensors[name].shape) != [int(s) for s in param.shape]:
            raise BlockFFNError(f"internal: draft tensor {name} has shape {list(tensors[name].shape)}, the library "
                                f"expects {[int(s) for s in param.shape]}")
    metadata = {"model_type": "eagle", "kv_state_kind": "kv_cache", "max_batch_size": max_batch_size,
                "context_window_size": context_window, "params": [
                    {"name": n, "shape": list(t.shape), "dtype": dtype} for n, t in tensors.items()]}
    logger.info(f"  draft head {draft_dir} ({sum(t.size for t in tensors.values()) / 1e6:.2f}M parameters)")
    lib_name, functions = build_library(mod, metadata, out)
    write_tensor_cache(tensors, out)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    manifest = {
        "format": DRAFT_FORMAT, "blockffn_version": __version__, "kind": "eagle", "library": lib_name,
        **library_fields(out / lib_name),
        "dtype": dtype, "functions": functions, "params": metadata["params"],
        "versions": target_versions(), "target": {"name": target_name},
        "token_map": None if draft.d2t is None else [int(t) for t in draft.d2t.tolist()],
        "draft_vocab_size": cfg.draft_vocab_size, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "source": str(Path(draft_dir).resolve()),
    }
    (out / DRAFT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"folder": out.name, "kind": "eagle", "library": lib_name}


def target_versions() -> dict:
    import tvm
    import tvm_ffi

    return {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__, "blockffn": __version__}


def token_map_array(manifest: dict) -> np.ndarray | None:
    tm = manifest.get("token_map")
    return None if tm is None else np.asarray(tm, dtype=np.int64)
