"""Streaming access to a checkpoint's tensors, one at a time (convert-weight and compile never hold the model).

The reading rules (layouts, shapes, finite values, no pickle) are `blockffn.model.checkpoint`'s."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from blockffn.errors import CheckpointError
from blockffn.model.checkpoint import (BIN_INDEX, SAFE_INDEX, check_finite, check_tensors, expected_shapes,
                                       official_layout, read_tensors)
from blockffn.model.config import BlockFFNConfig


class TensorSource:
    """Random access to a checkpoint's tensors, one at a time, in our layout (for streaming conversion).

    Only headers are read up front: every name and shape is checked against the config before any tensor is
    loaded.  Each ``get`` opens the safetensors file, copies that one tensor out and closes (unmaps) the file, so
    resident memory holds the tensors being converted, never the model.  Tensors an official layout packs
    together (a fused ``qkv_proj``) are split once and their siblings kept until asked for.  ``pytorch_model.bin``
    files are memory-mapped (``torch.load(mmap=True, weights_only=True)``), which bounds memory less tightly.
    """

    def __init__(self, folder: str | Path, cfg: BlockFFNConfig):
        self.folder, self.cfg = Path(folder), cfg
        self._files = self._locate()  # stored name -> file
        self._bins: dict[Path, dict] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._source_of: dict[str, str] = {}  # our name -> stored name
        shapes = {}
        for stored, (shape, dtype) in self._headers().items():
            for ours, t in official_layout(stored, torch.empty(shape, dtype=dtype, device="meta"), cfg):
                self._source_of[ours] = stored
                shapes[ours] = t
        check_tensors(shapes, cfg, str(self.folder))
        self.names = [n for n in expected_shapes(cfg)]

    def _locate(self) -> dict[str, Path]:
        folder = self.folder
        for index_name in (SAFE_INDEX, BIN_INDEX):
            if (folder / index_name).exists():
                try:
                    weight_map = json.loads((folder / index_name).read_text())["weight_map"]
                    files = {n: folder / f for n, f in weight_map.items()}
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise CheckpointError(f"{folder / index_name}: malformed index ({e})") from None
                for f in sorted(set(files.values())):
                    if not f.exists():
                        raise CheckpointError(f"{f}: shard listed in {index_name} is missing")
                return files
        singles = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else sorted(
            folder.glob("*.safetensors"))
        path = singles[0] if len(singles) == 1 else folder / "pytorch_model.bin"
        if not path.exists():
            read_tensors(folder)  # raises the loader's one-line error (pickle refusal, nothing found)
        return {n: path for n in self._keys(path)}

    def _keys(self, path: Path) -> list[str]:
        return list(self._header(path))

    def _header(self, path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if path.suffix != ".safetensors":
            return {n: (tuple(t.shape), t.dtype) for n, t in self._bin(path).items()}
        try:
            with safe_open(str(path), framework="pt") as f:
                out = {}
                for n in f.keys():
                    sl = f.get_slice(n)
                    out[n] = (tuple(sl.get_shape()), _SAFE_DTYPES.get(sl.get_dtype(), torch.float32))
                return out
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def _headers(self) -> dict:
        out = {}
        for path in sorted(set(self._files.values())):
            for name, meta in self._header(path).items():
                if self._files.get(name) != path:
                    raise CheckpointError(f"{path}: tensor '{name}' is not listed for this shard in the index")
                out[name] = meta
        missing = [n for n in self._files if n not in out]
        if missing:
            raise CheckpointError(f"{self.folder}: tensor '{missing[0]}' is listed but in no shard")
        return out

    def _bin(self, path: Path) -> dict:
        if path not in self._bins:
            try:
                self._bins[path] = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises UnpicklingError/RuntimeError variants
                raise CheckpointError(f"{path}: cannot be read safely with weights_only=True "
                                      f"({type(e).__name__})") from None
        return self._bins[path]

    def _load_stored(self, stored: str) -> torch.Tensor:
        path = self._files[stored]
        if path.suffix != ".safetensors":
            return self._bin(path)[stored]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(stored).clone()  # a copy that outlives the mapping
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (our layout, stored dtype)."""
        if name in self._pending:
            return self._pending.pop(name)
        if name not in self._source_of and name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return self.get("model.embed_tokens.weight")
        stored = self._source_of[name]
        out = None
        loaded = self._load_stored(stored)
        check_finite(stored, loaded, str(self.folder))
        for ours, t in official_layout(stored, loaded, self.cfg):
            if ours == name:
                out = t.contiguous()
            else:
                self._pending[ours] = t.contiguous()
        return out


_SAFE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
