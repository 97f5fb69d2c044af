"""PyTorch BlockFFN model, configs, presets and official-format checkpoint IO."""

from blockffn.model.checkpoint import load_model, save_model
from blockffn.model.config import BlockFFNConfig
from blockffn.model.modeling import BlockFFNForCausalLM, KVCache
from blockffn.model.presets import PRESETS, preset_config

__all__ = ["BlockFFNConfig", "BlockFFNForCausalLM", "KVCache", "PRESETS", "load_model", "preset_config",
           "save_model"]
