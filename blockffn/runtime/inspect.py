"""`blockffn inspect`: what an artifact holds, read from its files and (for host libraries) its `_metadata`."""

from __future__ import annotations

from pathlib import Path

from blockffn.artifacts.reader import library_metadata, open_artifact


def describe(path: str | Path) -> dict:
    art = open_artifact(path)
    sizes = {"library": art.library.stat().st_size,
             "weights": sum(s["nbytes"] for s in art.tensor_cache["records"]),
             "total": sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())}
    metadata = library_metadata(art.library) if art.manifest["target"]["device"] == "cpu" else None
    return {"manifest": art.manifest, "functions": art.manifest.get("functions", []), "sizes": sizes,
            "metadata": metadata}
