"""BlockFFN model configuration in the official Hugging Face `config.json` format.

Keys and defaults follow the official bmt->HF converter (research/blockffn.md §3.2) so that a `config.json`
written here loads in the official `MiniCPMForCausalLM` remote code and vice versa.  Two attention families:
``attention_type == "mla"`` (Small..XLarge) and ``"gqa"`` (the 2.8B acceleration model).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockffn.errors import ConfigError

ATTENTION_TYPES = ("mla", "gqa")


@dataclass
class BlockFFNConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    attention_type: str = "mla"
    # MLA (ignored for GQA)
    q_lora_rank: int = 128
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    # GQA head size (ignored for MLA); None means hidden_size // num_attention_heads
    head_dim: int | None = None
    # BlockFFN
    num_experts: int = 16
    expert_size: int = 64
    router_act: str = "relu"
    norm_after_router: str = "rms"
    norm_scale: float = 1.0
    ffn_type: str = "block_linear"
    ffn_gated: bool = True  # leftover key of the official converter; unused by the block FFN
    block_implementation: str = "torch"
    intermediate_size: int = 1024  # leftover key (template); the FFN width is num_experts * expert_size
    # MiniCPM scalings
    scale_emb: float = 12.0
    dim_model_base: int = 256
    scale_depth: float = 1.4
    tie_word_embeddings: bool = False
    # misc
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    max_position_embeddings: int = 4096
    initializer_range: float = 0.1
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict)  # unknown keys, round-tripped verbatim

    # ---- derived -----------------------------------------------------------------------------------------
    @property
    def ffn_width(self) -> int:
        return self.num_experts * self.expert_size

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def mla_q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_input_scale(self) -> float:
        """The final hidden state is divided by this before the LM head."""
        return self.hidden_size / self.dim_model_base

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self) -> "BlockFFNConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts",
                    "expert_size"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"config key '{key}' must be a positive integer, got {v!r}")
        need(self.attention_type in ATTENTION_TYPES,
             f"config key 'attention_type' must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        need(self.router_act == "relu", f"config key 'router_act' must be 'relu' (BlockFFN), got {self.router_act!r}")
        need(self.norm_after_router == "rms",
             f"config key 'norm_after_router' must be 'rms' (BlockFFN), got {self.norm_after_router!r}")
        need(self.ffn_type == "block_linear",
             f"config key 'ffn_type' must be 'block_linear', got {self.ffn_type!r}")
        need(self.hidden_act == "silu", f"config key 'hidden_act' must be 'silu', got {self.hidden_act!r}")
        need(self.rms_norm_eps > 0, f"config key 'rms_norm_eps' must be > 0, got {self.rms_norm_eps!r}")
        if self.attention_type == "mla":
            for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim"):
                v = getattr(self, key)
                need(isinstance(v, int) and v > 0, f"config key '{key}' must be a positive integer for MLA, got {v!r}")
            need(self.qk_rope_head_dim % 2 == 0, "config key 'qk_rope_head_dim' must be even (rotate-half RoPE)")
            # The official HF MLAAttention uses hidden_size // num_heads as the value head size.
            need(self.hidden_size % self.num_attention_heads == 0,
                 "config key 'hidden_size' must be divisible by 'num_attention_heads'")
            need(self.v_head_dim == self.hidden_size // self.num_attention_heads,
                 f"config key 'v_head_dim' ({self.v_head_dim}) must equal hidden_size // num_attention_heads "
                 f"({self.hidden_size // self.num_attention_heads}) as in the official MLA")
        else:
            need(self.num_attention_heads % self.num_key_value_heads == 0,
                 "config key 'num_attention_heads' must be a multiple of 'num_key_value_heads'")
            need(self.gqa_head_dim % 2 == 0, "GQA head size must be even (rotate-half RoPE)")
        if self.rope_scaling not in (None, {}):
            raise ConfigError("config key 'rope_scaling' is not supported (must be null)")
        return self

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.head_dim is None:
            d.pop("head_dim")
        if self.pad_token_id is None:
            d.pop("pad_token_id")
        d["architectures"] = ["MiniCPMForCausalLM"]
        d["model_type"] = "minicpm"
        d["auto_map"] = {
            "AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
        }
        out = dict(self.extra)
        out.update(d)
        return dict(sorted(out.items()))

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "BlockFFNConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        # The 2.8B engine reads the FFN width from intermediate_size when expert_size is absent.
        if "expert_size" not in raw and "num_experts" in raw and "intermediate_size" in raw:
            kwargs["expert_size"] = raw["intermediate_size"] // raw["num_experts"]
        if "attention_type" not in raw:
            kwargs["attention_type"] = "mla" if "q_lora_rank" in raw else "gqa"
        if kwargs.get("attention_type") == "mla" and "v_head_dim" not in raw and "hidden_size" in raw:
            kwargs["v_head_dim"] = raw["hidden_size"] // raw.get("num_attention_heads", 1)
        if raw.get("rope_theta") is None:
            kwargs.pop("rope_theta", None)  # absent/null -> HF default 10000
        for key in ("rms_norm_eps", "scale_emb", "scale_depth", "rope_theta", "norm_scale", "initializer_range"):
            if key in kwargs and not isinstance(kwargs[key], (int, float)):
                raise ConfigError(f"config key '{key}' must be a number, got {kwargs[key]!r}")
        try:
            cfg = cls(**kwargs, extra=extra)
        except TypeError as e:  # pragma: no cover - dataclass init only fails on programming errors
            raise ConfigError(f"invalid config.json: {e}") from None
        return cfg.validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BlockFFNConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found (a BlockFFN model folder needs config.json)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_hf_dict(raw)

    def replace(self, **changes) -> "BlockFFNConfig":
        return dataclasses.replace(self, **changes).validate()
