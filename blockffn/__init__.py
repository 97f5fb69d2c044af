"""blockffn: train, compile (Apache TVM) and run BlockFFN chunk-sparse MoE language models on edge devices."""

from pathlib import Path

__version__ = "0.1.0"


def default_model_path() -> Path:
    """Folder of the small trained BlockFFN bundled with the package (the default input of every command)."""
    return Path(__file__).resolve().parent / "bundled" / "blockffn-tiny"


def bundled_path(name: str) -> Path:
    """A data file shipped in ``blockffn/bundled`` (e.g. the held-out text ``heldout.txt.xz``)."""
    return Path(__file__).resolve().parent / "bundled" / name


def cache_dir() -> Path:
    """Per-user cache (compiled bundled model, speculative cost profiles); ``BLOCKFFN_CACHE`` overrides it."""
    import os

    return Path(os.environ.get("BLOCKFFN_CACHE", Path.home() / ".cache" / "blockffn"))


def bundled_fingerprint() -> str:
    """Short digest of the bundled model's config and weights.  The compiled cache is keyed by it, so a package update
    that ships new weights under the same version never runs the library compiled for the old ones."""
    import hashlib

    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(default_model_path() / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def default_artifact_path(target: str = "cpu") -> Path:
    """Where commands that run a compiled library (chat, bench) keep the bundled model compiled for ``target``."""
    return cache_dir() / "artifacts" / f"blockffn-tiny-{__version__}-{bundled_fingerprint()}-{target}"
