"""Open an artifact folder and check it is complete and intact before anything loads it.

Every failure is a one-line `ArtifactError` naming the file: missing or truncated shard, md5 mismatch, a
library built by another TVM version, a malformed JSON document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from blockffn.artifacts.layout import CHAT_CONFIG, MANIFEST, TENSOR_CACHE
from blockffn.artifacts.weights import file_md5
from blockffn.errors import BlockFFNError
from blockffn.model.config import BlockFFNConfig


class ArtifactError(BlockFFNError):
    """A compiled artifact folder that is incomplete, corrupt or built for another runtime."""


@dataclass
class _LibraryFolder:
    """A folder holding a model library, its manifest and its tensor cache."""

    path: Path
    manifest: dict
    tensor_cache: dict

    @property
    def library(self) -> Path:
        return self.path / self.manifest["library"]

    @property
    def param_names(self) -> list[str]:
        return [p["name"] for p in self.manifest["params"]]


@dataclass
class Artifact(_LibraryFolder):
    chat_config: dict
    config: BlockFFNConfig


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ArtifactError(f"{path}: missing (not a complete blockffn artifact; recompile with blockffn-compile)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


def check_versions(manifest: dict, path: Path) -> None:
    import tvm
    import tvm_ffi

    built = manifest.get("versions", {})
    have = {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}
    for key, version in have.items():
        if built.get(key) != version:
            raise ArtifactError(f"{path}: library built with {key} {built.get(key)} but this runtime has {version}; "
                                f"recompile it with blockffn-compile")


def check_shards(path: Path, cache: dict, verify_md5: bool = True) -> None:
    for shard in cache.get("records", []):
        f = path / shard["dataPath"]
        if not f.exists():
            raise ArtifactError(f"{f}: weight shard missing")
        size = f.stat().st_size
        if size != shard["nbytes"]:
            raise ArtifactError(f"{f}: weight shard is {size} bytes, expected {shard['nbytes']} (truncated or "
                                f"corrupt)")
        if verify_md5 and file_md5(f) != shard["md5sum"]:
            raise ArtifactError(f"{f}: md5 mismatch (corrupt weight shard)")


def open_artifact(path: str | Path, verify_md5: bool = True) -> Artifact:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact folder")
    manifest = _read_json(path / MANIFEST)
    chat_config = _read_json(path / CHAT_CONFIG)
    cache = _read_json(path / TENSOR_CACHE)
    check_versions(manifest, path / MANIFEST)
    lib = path / manifest.get("library", "")
    if not manifest.get("library") or not lib.exists():
        raise ArtifactError(f"{lib}: model library missing")
    check_shards(path, cache, verify_md5)
    cfg = BlockFFNConfig.from_hf_dict({k: v for k, v in chat_config["model_config"].items()
                                       if k not in ("context_window_size", "prefill_chunk_size",
                                                    "tensor_parallel_shards", "max_batch_size")})
    return Artifact(path, manifest, cache, chat_config, cfg)


@dataclass
class DraftArtifact(_LibraryFolder):
    """``ARTIFACT/draft``: an EAGLE draft head's library and weights (see blockffn.compiler.compile_draft)."""


def open_draft(path: str | Path, verify_md5: bool = True) -> DraftArtifact:
    from blockffn.compiler.compile_draft import DRAFT_FORMAT, DRAFT_MANIFEST

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a draft folder")
    manifest = _read_json(path / DRAFT_MANIFEST)
    if manifest.get("format") != DRAFT_FORMAT:
        raise ArtifactError(f"{path / DRAFT_MANIFEST}: format {manifest.get('format')!r}, expected {DRAFT_FORMAT!r}")
    cache = _read_json(path / TENSOR_CACHE)
    check_versions(manifest, path / DRAFT_MANIFEST)
    if not (path / manifest.get("library", "")).is_file():
        raise ArtifactError(f"{path / manifest.get('library', '')}: draft library missing")
    check_shards(path, cache, verify_md5)
    return DraftArtifact(path, manifest, cache)
