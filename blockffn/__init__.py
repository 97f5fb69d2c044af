"""blockffn: train, compile (Apache TVM) and run BlockFFN chunk-sparse MoE language models on edge devices."""

from pathlib import Path

__version__ = "0.1.0"


def default_model_path() -> Path:
    """Folder of the small trained BlockFFN bundled with the package (the default input of every command)."""
    return Path(__file__).resolve().parent / "bundled" / "blockffn-tiny"
