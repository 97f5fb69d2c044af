"""`blockffn inspect`: what an artifact holds, read from its files alone.

The library is never loaded (it is native code, and for a GPU or cross-compiled target it cannot be loaded here
anyway): what its ``_metadata`` says was recorded in the manifest at compile time, and the library's size and
sha256 are checked against the manifest, so the manifest speaks for it.
"""

from __future__ import annotations

from pathlib import Path

from blockffn.artifacts.reader import open_artifact


def describe(path: str | Path) -> dict:
    art = open_artifact(path)
    m = art.manifest
    sizes = {"library": art.library.stat().st_size,
             "weights": sum(s["nbytes"] for s in art.tensor_cache["records"]),
             "total": sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())}
    recorded = m.get("metadata") if isinstance(m.get("metadata"), dict) else {}
    metadata = {**recorded, "params": m["params"], "memory_usage": m.get("memory_usage") or {}}
    return {"manifest": m, "functions": m["functions"], "sizes": sizes, "metadata": metadata}
