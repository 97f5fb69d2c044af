"""Open an artifact folder and check it is complete and intact before anything loads it.

Every failure is a one-line `ArtifactError` naming the file: missing or truncated shard, md5 mismatch, a
library built by another TVM version, a malformed JSON document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from blockffn.artifacts.integrity import ArtifactError, check_draft_manifest, check_library, check_manifest
from blockffn.artifacts.layout import (CHAT_CONFIG, LIBRARY_MANIFEST_KEY, MANIFEST, TENSOR_CACHE,
                                      config_from_chat_config, manifest_from_metadata)
from blockffn.artifacts.weights import file_md5
from blockffn.model.config import BlockFFNConfig


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
    """A JSON object from an artifact file (anything else, or unreadable bytes, is refused in one line)."""
    if not path.exists():
        raise ArtifactError(f"{path}: missing (not a complete blockffn artifact; recompile with blockffn-compile)")
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ArtifactError(f"{path}: cannot be read ({e})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path}: a JSON {type(doc).__name__}, expected an object")
    return doc


def check_versions(manifest: dict, path: Path) -> None:
    import tvm
    import tvm_ffi

    built = manifest.get("versions", {})
    have = {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__}
    for key, version in have.items():
        if built.get(key) != version:
            raise ArtifactError(f"{path}: library built with {key} {built.get(key)} but this runtime has {version}; "
                                f"recompile it with blockffn-compile")


def inside(folder: Path, name, what: str) -> Path:
    """``folder / name`` for a file name an artifact document gives, refused in one line unless it stays inside
    the folder: a relative path without ``..`` whose resolved location (symlinks followed) is under the folder.
    An artifact is data from elsewhere; nothing it names may reach other files (or other libraries to load)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ArtifactError(f"{folder}: {what} {name!r} is not a file name inside the artifact folder")
    f = folder / name
    if not f.resolve().is_relative_to(folder.resolve()):
        raise ArtifactError(f"{folder}: {what} {name!r} leads outside the artifact folder (a symlink)")
    return f


# bytes per element of the dtypes a tensor cache holds
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "uint32": 4, "int32": 4, "int8": 1, "uint8": 1,
            "int64": 8, "float64": 8}


def _check_records(f: Path, shard: dict, size: int) -> None:
    """Every tensor's byte range lies inside its shard, is exactly shape × dtype and overlaps no other (a range
    past the end would be read out of bounds by the loader; an overlapping one would silently load other weights)."""
    for r in shard.get("records", []):
        name, shape, off, nb = r.get("name"), r.get("shape"), r.get("byteOffset"), r.get("nbytes")
        if (not isinstance(off, int) or not isinstance(nb, int) or off < 0 or nb < 0 or off + nb > size
                or isinstance(off, bool) or isinstance(nb, bool)):
            raise ArtifactError(f"{f}: tensor {name!r} claims bytes {off}+{nb} of a {size}-byte shard (corrupt "
                                f"tensor-cache.json)")
        if (not isinstance(r.get("dtype"), str) or r["dtype"] not in ITEMSIZE or not isinstance(shape, list)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape)):
            raise ArtifactError(f"{f}: tensor {name!r} has an invalid shape {shape!r} or dtype {r.get('dtype')!r} "
                                f"(corrupt tensor-cache.json)")
        n = ITEMSIZE[r["dtype"]]
        for v in shape:
            n *= v
        if n != nb:
            raise ArtifactError(f"{f}: tensor {name!r} is {shape} {r['dtype']} = {n} bytes but its record says "
                                f"{nb} (corrupt tensor-cache.json)")
    ranges = sorted(((r["byteOffset"], r["byteOffset"] + r["nbytes"], r.get("name")) for r in shard.get("records", [])),
                    key=lambda t: t[:2])
    for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
        if start < end:
            raise ArtifactError(f"{f}: tensors {a!r} and {b!r} overlap in the shard (corrupt tensor-cache.json)")


def _check_layout(path: Path, cache: dict) -> None:
    """``records`` is a list of shard objects, each with a list of named tensor records."""
    shards = cache.get("records")
    if not (isinstance(shards, list) and all(
            isinstance(s, dict) and isinstance(s.get("records", []), list)
            and all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in s.get("records", []))
            for s in shards)):
        raise ArtifactError(f"{path / TENSOR_CACHE}: 'records' is not a list of shards holding named tensor records "
                            f"(corrupt tensor-cache.json)")


def check_shards(path: Path, cache: dict, verify_md5: bool = True) -> None:
    _check_layout(path, cache)
    for shard in cache.get("records", []):
        f = inside(path, shard.get("dataPath"), "tensor-cache dataPath")
        if not f.is_file():
            raise ArtifactError(f"{f}: weight shard missing")
        size = f.stat().st_size
        if size != shard.get("nbytes"):
            raise ArtifactError(f"{f}: weight shard is {size} bytes, expected {shard.get('nbytes')} (truncated or "
                                f"corrupt)")
        _check_records(f, shard, size)
        if verify_md5 and file_md5(f) != shard.get("md5sum"):
            raise ArtifactError(f"{f}: md5 mismatch (corrupt weight shard)")


def library_metadata(library: Path) -> dict:
    """Call a library's ``_metadata()`` (a constant string), on the host, or on the GPU for a library that the
    host VM cannot be set up for."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    error = None
    for device in (tvm.cpu(), tvm.cuda(0)):
        try:
            vm = VirtualMachine(tvm.runtime.load_module(str(library)), device)
            return json.loads(str(vm["_metadata"]()))
        except Exception as e:  # a foreign file, a library for a device this runtime cannot load
            error = error or e
    raise ArtifactError(f"{library}: cannot read the library's _metadata ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None


def library_manifest(library: Path) -> dict:
    """The manifest a library built by ``blockffn-compile -o NAME.so`` carries in its ``_metadata``."""
    metadata = library_metadata(library)
    if LIBRARY_MANIFEST_KEY not in metadata:
        raise ArtifactError(f"{library}: not a blockffn model library (its _metadata has no '{LIBRARY_MANIFEST_KEY}' "
                            f"entry; rebuild it with blockffn-compile)")
    return manifest_from_metadata(metadata, str(library.resolve()))


def check_weights_match(manifest: dict, cache: dict, path: Path) -> None:
    """Refuse a library and weights made for each other's quantization or layout, in one line."""
    record = (cache.get("metadata") or {}).get(LIBRARY_MANIFEST_KEY)
    lib = manifest.get("library")
    if record is not None:
        for key, what in (("quantization", "quantization"), ("weight_layout", "weight layout")):
            if record.get(key) != manifest.get(key):
                raise ArtifactError(
                    f"{path / TENSOR_CACHE}: weights converted for {what} {record.get(key)!r} but the library "
                    f"{lib} expects {manifest.get(key)!r}; run `blockffn convert-weight --dtype "
                    f"{manifest.get('quantization')}` for this library")
    stored = {r["name"]: r for shard in cache.get("records", []) for r in shard.get("records", [])}
    for p in manifest.get("params", []):
        r = stored.get(p["name"])
        if r is None or list(r["shape"]) != list(p["shape"]) or r["dtype"] != p["dtype"]:
            got = "missing" if r is None else f"{r['dtype']} {list(r['shape'])}"
            raise ArtifactError(f"{path / TENSOR_CACHE}: tensor '{p['name']}' is {got} but the library {lib} expects "
                                f"{p['dtype']} {list(p['shape'])}; the weights and the library were made for "
                                f"different models or --dtype")


def open_artifact(path: str | Path, verify_md5: bool = True, model_lib: str | Path | None = None) -> Artifact:
    """An artifact folder: weights, mlc-chat-config.json and a library, either the one its manifest names or
    ``model_lib`` (a library built alone by ``blockffn-compile -o NAME.so``, whose ``_metadata`` says which
    weights it expects)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact folder")
    if model_lib is None and not (path / MANIFEST).exists() and (path / TENSOR_CACHE).exists():
        raise ArtifactError(f"{path}: has weights but no {MANIFEST}; pass the model library built for it "
                            f"(--model-lib NAME.so from `blockffn-compile -o NAME.so`)")
    if model_lib is not None:
        lib = Path(model_lib)
        if not lib.is_file():
            raise ArtifactError(f"{lib}: model library missing")
        manifest = library_manifest(lib)
    else:
        manifest = check_manifest(_read_json(path / MANIFEST), path / MANIFEST)
    chat_config = _read_json(path / CHAT_CONFIG)
    cache = _read_json(path / TENSOR_CACHE)
    check_versions(manifest, path / MANIFEST if model_lib is None else Path(model_lib))
    lib = Path(model_lib) if model_lib is not None else inside(path, manifest.get("library"), "manifest library")
    if not lib.is_file():
        raise ArtifactError(f"{lib}: model library missing")
    if model_lib is None:  # a --model-lib is the user's own choice, read through its _metadata
        check_library(manifest, lib, path / MANIFEST)
    check_shards(path, cache, verify_md5)
    check_weights_match(manifest, cache, path)
    cfg = config_from_chat_config(chat_config, path / CHAT_CONFIG)
    return Artifact(path, manifest, cache, chat_config, cfg)


@dataclass
class DraftArtifact(_LibraryFolder):
    """``ARTIFACT/draft``: an EAGLE draft head's library and weights (see blockffn.compiler.compile_draft)."""


def open_draft(path: str | Path, verify_md5: bool = True) -> DraftArtifact:
    from blockffn.artifacts.layout import DRAFT_FORMAT, DRAFT_MANIFEST

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a draft folder")
    manifest = _read_json(path / DRAFT_MANIFEST)
    if manifest.get("format") != DRAFT_FORMAT:
        raise ArtifactError(f"{path / DRAFT_MANIFEST}: format {manifest.get('format')!r}, expected {DRAFT_FORMAT!r}")
    cache = _read_json(path / TENSOR_CACHE)
    check_draft_manifest(manifest, path / DRAFT_MANIFEST)
    check_versions(manifest, path / DRAFT_MANIFEST)
    lib = inside(path, manifest.get("library"), "draft manifest library")
    if not lib.is_file():
        raise ArtifactError(f"{lib}: draft library missing")
    check_library(manifest, lib, path / DRAFT_MANIFEST)
    check_shards(path, cache, verify_md5)
    return DraftArtifact(path, manifest, cache)
