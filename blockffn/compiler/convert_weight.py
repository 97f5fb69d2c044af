"""`blockffn convert-weight`: a checkpoint's weights as the tensor cache a model library expects, streamed.

MLC's ``convert_weight`` split: the weights of an artifact (``params_shard_*.bin`` + ``tensor-cache.json``) are
written without building a library, one tensor at a time — read from its (sharded) safetensors file, put in the
library's layout (down-projection transposed, or q4 group-quantized expert-major), cast to the storage dtype and
appended to the current 32 MB shard — so peak memory is a few tensors plus one shard, not the model.
``blockffn-compile`` with a folder output runs exactly this code for its weights.

The library's parameter list (names, shapes, dtypes, order) comes from the Relax model's declaration for the config
and ``--dtype``, without exporting or building it.  The weights record (quantization, layout) goes in the tensor
cache's ``metadata`` so the runtime can refuse a library built for other weights.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from blockffn.artifacts import layout
from blockffn.artifacts.weights import param_records, to_numpy, write_tensor_cache
from blockffn.errors import BlockFFNError
from blockffn.model.checkpoint import TOKENIZER_FILES, checkpoint_sha256
from blockffn.model.tensor_source import TensorSource
from blockffn.model.config import BlockFFNConfig

logger = logging.getLogger(__name__)

ROWS_PER_BLOCK = 8192  # rows converted at a time: bounds the fp32 temporaries of a large embedding / LM head


def weight_layout(quantization: str) -> dict:
    """The layout record both the library and the weights carry (the runtime compares them)."""
    from blockffn.compiler.quantization import Q4_EXPERT_LAYOUT, scheme_for

    return {"names": "official HF names",
            "transforms": [Q4_EXPERT_LAYOUT if scheme_for(quantization) is not None else layout.DOWN_PROJ_TRANSPOSED,
                           layout.FUSED_QKV]}


def library_params(cfg: BlockFFNConfig, quantization: str) -> list[dict]:
    """The model library's parameters in order, ``[{name, shape, dtype}]``: the Relax model's declaration (the
    same list ``export_tvm`` returns), for the config alone."""
    from blockffn.compiler.quantization import scheme_for
    from blockffn.compiler.relax_model import RelaxBlockFFN

    model = RelaxBlockFFN(cfg, layout.storage_dtype(quantization), scheme_for(quantization), False)
    return [{"name": n, "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)} for n, p in model.named_parameters()]


def hf_name(param: str) -> str:
    """Library parameter -> the checkpoint tensor it is made from (``X.q_weight``/``X.q_scale`` -> ``X.weight``,
    or the suffix-less expert tensor)."""
    for part in (".q_weight", ".q_scale"):
        if param.endswith(part):
            base = param[: -len(part)]
            return base if base.endswith(("mlp.up_proj", "mlp.down_proj")) else base + ".weight"
    return param


def library_tensors_of(name: str, tensor, cfg: BlockFFNConfig, quantization: str) -> dict[str, np.ndarray]:
    """One checkpoint tensor -> its library tensors (q4: ``q_weight``/``q_scale``; else the cast, transposed
    down-projection), converted in blocks of rows so a large embedding never has several fp32 copies alive."""
    from blockffn.compiler.quantization import library_tensors, scheme_for

    scheme = scheme_for(quantization)
    if scheme is None:
        return {name: to_numpy(layout.to_library_layout(name, tensor), layout.storage_dtype(quantization))}
    if tensor.ndim != 2 or tensor.shape[0] <= ROWS_PER_BLOCK or name.endswith(("mlp.up_proj", "mlp.down_proj")):
        return library_tensors({name: tensor}, cfg, scheme)
    parts = [library_tensors({name: tensor[i:i + ROWS_PER_BLOCK]}, cfg, scheme)
             for i in range(0, tensor.shape[0], ROWS_PER_BLOCK)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def stream_library_tensors(source: TensorSource, params: list[dict], cfg: BlockFFNConfig, quantization: str):
    """Yield ``(param name, array)`` in the library's order, converting each checkpoint tensor once."""
    pending: dict[str, np.ndarray] = {}
    for p in params:
        name = p["name"]
        if name not in pending:
            parts = [source.get(n) for n in layout.library_sources(hf_name(name))]
            tensor = parts[0] if len(parts) == 1 else _concat_rows(parts)
            pending.update(library_tensors_of(hf_name(name), tensor, cfg, quantization))
        arr = pending.pop(name)
        if list(arr.shape) != p["shape"] or str(arr.dtype) != p["dtype"]:
            raise BlockFFNError(f"internal: {name} converts to {list(arr.shape)} {arr.dtype} but the library "
                                f"expects {p['shape']} {p['dtype']}")
        yield name, arr
    if pending:
        raise BlockFFNError(f"internal: converted tensors {sorted(pending)} are not library parameters")


def _concat_rows(parts):
    import torch

    return torch.cat(parts, dim=0)


def weights_record(quantization: str, params: list[dict], source_dir: Path) -> dict:
    """``tensor-cache.json`` metadata: MLC's totals plus what the runtime matches a library against."""
    size = sum(int(np.prod(p["shape"])) for p in params)
    nbytes = sum(int(np.prod(p["shape"])) * np.dtype(_np_dtype(p["dtype"])).itemsize for p in params)
    return {"ParamSize": size, "ParamBytes": nbytes, "BitsPerParam": 8 * nbytes / max(size, 1),
            "blockffn": {"quantization": quantization, "dtype": layout.storage_dtype(quantization),
                         "weight_layout": weight_layout(quantization),
                         "source": {"path": str(source_dir.resolve()), "sha256": checkpoint_sha256(source_dir)}}}


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def write_weights(model_dir: Path, cfg: BlockFFNConfig, quantization: str, out_dir: Path,
                  source: TensorSource | None = None) -> dict:
    """Stream the checkpoint into ``out_dir`` (tensor cache + its legacy twin + tokenizer files); returns the
    tensor cache document.  ``source``: an already opened (checked) `TensorSource` of ``model_dir``."""
    params = library_params(cfg, quantization)
    source = source or TensorSource(model_dir, cfg)  # checks every name and shape from the headers first
    record = weights_record(quantization, params, model_dir)
    cache = write_tensor_cache(stream_library_tensors(source, params, cfg, quantization), out_dir, metadata=record)
    for f in TOKENIZER_FILES:
        if (model_dir / f).exists():
            shutil.copyfile(model_dir / f, out_dir / f)
    return cache


def param_bytes(cache: dict) -> int:
    return sum(r["nbytes"] for r in param_records(cache))


WEIGHT_FILES = ("params_shard_*.bin", layout.TENSOR_CACHE, layout.LEGACY_TENSOR_CACHE)


def convert_weight(model_dir: Path, quantization: str, output: Path, overwrite: bool = False) -> dict:
    """`blockffn convert-weight`: stream ``model_dir``'s checkpoint into ``output``'s tensor cache (the folder may
    already hold a chat config or libraries; only weight files are replaced, and only with ``overwrite``)."""
    from blockffn.compiler.resources import PhaseTimer
    from blockffn.outputs import files_into_dir

    layout.storage_dtype(quantization)  # one-line refusal of an unknown --dtype
    timer = PhaseTimer()
    with timer("read config"):
        cfg = BlockFFNConfig.load(Path(model_dir) / "config.json")
    logger.info(f"converting {model_dir} to {quantization} -> {output}")
    with files_into_dir(output, overwrite, owned=WEIGHT_FILES,
                        last=(layout.TENSOR_CACHE, layout.LEGACY_TENSOR_CACHE)) as tmp:
        with timer("weights"):
            cache = write_weights(Path(model_dir), cfg, quantization, tmp)
    return {"output": str(output), "quantization": quantization, "param_bytes": param_bytes(cache),
            "shards": len(cache["records"]), "seconds": timer.times, "peak_rss_mb": timer.peak_rss_mb}
