"""PyTorch BlockFFN model, configs, presets and official-format checkpoint IO.

Names are resolved lazily so that light users (the runtime reading an artifact's config) do not import torch or
safetensors.
"""

from importlib import import_module

_EXPORTS = {
    "BlockFFNConfig": "blockffn.model.config",
    "BlockFFNForCausalLM": "blockffn.model.modeling",
    "KVCache": "blockffn.model.modeling",
    "PRESETS": "blockffn.model.presets",
    "preset_config": "blockffn.model.presets",
    "load_model": "blockffn.model.checkpoint",
    "save_model": "blockffn.model.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'blockffn.model' has no attribute {name!r}")
