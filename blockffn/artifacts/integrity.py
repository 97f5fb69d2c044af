"""What must hold before a model library is loaded: it is byte for byte the library that was compiled, and the
manifest that names it has the shape every reader expects.

A library is native code mapped into the process: a truncated one dies with a bus error when a page past its end is
touched, another model's runs with the wrong functions.  So the compiler records the library's size and sha256 in
the manifest, and readers compare both before anything loads it (the size first: a truncated file is refused
without hashing).  A manifest missing a key or holding the wrong type is refused in one line instead of raising a
``KeyError`` deep inside a command.
"""

from __future__ import annotations

from pathlib import Path

from blockffn.artifacts.layout import LIBRARY_MANIFEST_KEY
from blockffn.artifacts.weights import file_digest
from blockffn.errors import BlockFFNError


class ArtifactError(BlockFFNError):
    """A compiled artifact folder that is incomplete, corrupt or built for another runtime."""


def library_fields(library: Path) -> dict:
    """The manifest entries that pin a library: its size in bytes and its sha256."""
    return {"library_bytes": library.stat().st_size, "library_sha256": file_digest(library, "sha256")}


def check_library(manifest: dict, library: Path, manifest_path: Path) -> None:
    """Refuse, in one line, a library whose size or sha256 differs from the manifest's (never load it)."""
    size, digest = manifest.get("library_bytes"), manifest.get("library_sha256")
    if not isinstance(size, int) or isinstance(size, bool) or not isinstance(digest, str):
        raise ArtifactError(f"{manifest_path}: no library size and sha256 (written by an older blockffn, or "
                             f"edited); recompile the artifact with blockffn-compile")
    actual = library.stat().st_size
    if actual != size:
        raise ArtifactError(f"{library}: {actual} bytes, but the manifest says {size} (a truncated or replaced "
                             f"library is never loaded; recompile or copy the artifact again)")
    if file_digest(library, "sha256") != digest:
        raise ArtifactError(f"{library}: sha256 differs from the manifest's (not the library compiled for this "
                             f"artifact; recompile or copy the artifact again)")


def check_agrees_with_library(metadata: dict, library: Path, stated: dict, complete: bool = False) -> None:
    """What a runtime took from a manifest (``stated``) must be what the loaded library's ``_metadata`` says: the
    library is pinned by its sha256, the manifest's other fields are not, and e.g. a KV cache sized past the compiled
    bounds would let kernels index past their buffers.  A model library embeds its half of the manifest (the
    ``blockffn`` entry: target, dtype, sizes, layout, versions), all of which must agree, as must its FFN lowering,
    function list and parameters; a draft library's sizes are top-level ``_metadata`` keys.  ``complete``: ``stated``
    is a whole manifest, so a key it lacks is a disagreement too."""
    embedded = metadata.get(LIBRARY_MANIFEST_KEY)
    reference = metadata
    if isinstance(embedded, dict):
        reference = dict(embedded, ffn=metadata.get("ffn"), functions=metadata.get("functions"),
                         params=[{k: p.get(k) for k in ("name", "shape", "dtype")} for p in metadata.get("params", [])])
    keys = sorted(reference) if complete and embedded else sorted(stated.keys() & reference.keys())
    for key in keys:
        if stated.get(key) != reference[key]:
            raise ArtifactError(f"{library}: compiled with {key} {str(reference[key])[:60]}, but the manifest says "
                                f"{str(stated.get(key))[:60]} (a damaged manifest; recompile the artifact)")


# key -> type every manifest reader relies on
MANIFEST_TYPES = {"target": dict, "library": str, "quantization": str, "versions": dict, "params": list,
                  "functions": list, "dtype": str, "ffn": dict, "max_batch_size": int, "context_window_size": int,
                  "prefill_chunk_size": int}
TARGET_TYPES = {"name": str, "device": str, "tvm_target": dict, "host_triple": str}
DRAFT_TYPES = {"library": str, "versions": dict, "params": list, "functions": list, "dtype": str, "target": dict,
               "hidden_size": int, "vocab_size": int, "draft_vocab_size": int}


def check_manifest(manifest, path: Path, keys: dict = MANIFEST_TYPES, target_keys: dict = TARGET_TYPES) -> dict:
    """``manifest`` if it is an object with every key a reader uses, of the right type; else one line naming the
    first bad key."""
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: not a JSON object (not a blockffn manifest)")
    for key, kind in keys.items():
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{path}: {_bad(manifest, key, kind)} (a damaged manifest; recompile the artifact)")
    target = manifest.get("target")
    if "target" in keys:
        for key, kind in target_keys.items():
            if not isinstance(target.get(key), kind):
                raise ArtifactError(f"{path}: target {_bad(target, key, kind)} (a damaged manifest; recompile)")
    for p in manifest.get("params", []):
        if not (isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("shape"), list)
                and isinstance(p.get("dtype"), str)):
            raise ArtifactError(f"{path}: a params entry is not {{name, shape, dtype}}: {str(p)[:80]}")
    return manifest


def check_draft_manifest(manifest, path: Path) -> dict:
    """A draft manifest with the keys the draft runtime reads, and a token map (if any) of distinct in-range ids."""
    check_manifest(manifest, path, DRAFT_TYPES, {"name": str})
    tm = manifest.get("token_map")
    if tm is not None and not (isinstance(tm, list) and len(tm) == manifest["draft_vocab_size"]
                               and all(isinstance(t, int) and 0 <= t < manifest["vocab_size"] for t in tm)
                               and len(set(tm)) == len(tm)):
        raise ArtifactError(f"{path}: token_map is not {manifest['draft_vocab_size']} distinct token ids below "
                            f"{manifest['vocab_size']} (a damaged manifest; recompile)")
    return manifest


def _bad(doc: dict, key: str, kind: type) -> str:
    if key not in doc:
        return f"has no {key!r}"
    return f"{key!r} is {type(doc[key]).__name__}, expected {kind.__name__}"
