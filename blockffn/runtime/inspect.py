"""`blockffn inspect`: what an artifact holds, read from its files and (for host libraries) its `_metadata`."""

from __future__ import annotations

import json
from pathlib import Path

from blockffn.artifacts.reader import open_artifact


def library_metadata(library: Path) -> dict:
    """Call the library's `_metadata()`; only possible for libraries this machine can load."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    return json.loads(str(vm["_metadata"]()))


def describe(path: str | Path) -> dict:
    art = open_artifact(path)
    sizes = {"library": art.library.stat().st_size,
             "weights": sum(s["nbytes"] for s in art.tensor_cache["records"]),
             "total": sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())}
    metadata = library_metadata(art.library) if art.manifest["target"]["device"] == "cpu" else None
    return {"manifest": art.manifest, "functions": art.manifest.get("functions", []), "sizes": sizes,
            "metadata": metadata}
