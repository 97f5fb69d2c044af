"""BlockFFN model configuration in the official Hugging Face `config.json` format.

Keys follow the official bmt->HF converter (research/blockffn.md §3.2) and values the official vocabulary of
``configuration_minicpm.py`` / ``modeling_minicpm.py`` (thunlp/BlockFFN ``pretrain/bmt_to_hf``), so that a
``config.json`` written here loads in the official ``MiniCPMForCausalLM`` remote code and the official engine, and
vice versa.  Two attention families: ``attention_type == "mla"`` (Small..XLarge) and ``"vanilla"`` (standard
multi-head / grouped-query attention: the 2.8B acceleration model).  ``"gqa"``, which older files of ours wrote, is
read as ``"vanilla"``.  A key absent from ``config.json`` takes the official ``MiniCPMConfig`` default, because
that is what the official code would run with.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockffn.errors import ConfigError

ATTENTION_TYPES = ("mla", "vanilla")
ATTENTION_ALIASES = {"gqa": "vanilla"}  # what releases of blockffn before the official vocabulary wrote
# Official values that mean the same computation as ours ("kernel" is the official CUDA kernel of the same math,
# "swish" is transformers' other name of SiLU).
BLOCK_IMPLEMENTATIONS = ("torch", "kernel")
HIDDEN_ACT_ALIASES = {"swish": "silu"}

# ``MiniCPMConfig.__init__`` defaults, applied to keys absent from a config.json (official meaning of absence).
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "attention_type": "vanilla", "num_attention_heads": 32, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32,
    "q_lora_rank": 768, "kv_lora_rank": 256, "ffn_type": "vanilla", "ffn_gated": True, "hidden_act": "silu",
    "router_act": "relu", "expert_size": 128, "num_experts": 40, "norm_after_router": "sum", "norm_scale": 1.0,
    "block_implementation": "torch", "max_position_embeddings": 4096, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True,
    "rope_theta": 10000.0, "rope_scaling": None, "scale_emb": 1, "dim_model_base": 1, "scale_depth": 1,
}
# Official keys whose non-default values select computations this product does not implement: key -> (allowed
# predicate, why).  They stay in ``extra`` (round-tripped) when they hold the default.
UNSUPPORTED_OFFICIAL = {
    "attention_bias": (lambda v: v in (False, None), "q/k/v/o biases are not implemented (BlockFFN has none)"),
    "pretraining_tp": (lambda v: v in (1, None), "the official BlockMLP raises for pretraining_tp > 1"),
}


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

    def __post_init__(self):
        if isinstance(self.attention_type, str):  # "gqa" from code or files of older releases
            self.attention_type = ATTENTION_ALIASES.get(self.attention_type, self.attention_type)

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
             f"config key 'attention_type' must be one of {ATTENTION_TYPES} (official values), "
             f"got {self.attention_type!r}")
        need(self.router_act == "relu", f"config key 'router_act' must be 'relu' (BlockFFN), got {self.router_act!r}")
        need(self.norm_after_router == "rms",
             f"config key 'norm_after_router' must be 'rms' (BlockFFN's router norm; the official 'sum' and 'none' "
             f"are the paper's ablation variants, not implemented), got {self.norm_after_router!r}")
        need(self.ffn_type == "block_linear",
             f"config key 'ffn_type' must be 'block_linear' or 'block' (a BlockFFN; the official 'vanilla' and 'moe' "
             f"are dense and top-k baselines), got {self.ffn_type!r}")
        need(self.block_implementation in BLOCK_IMPLEMENTATIONS,
             f"config key 'block_implementation' must be one of {BLOCK_IMPLEMENTATIONS} (the official 'fastmoe' and "
             f"'megablocks' store experts in other tensors), got {self.block_implementation!r}")
        need(isinstance(self.tie_word_embeddings, bool),
             f"config key 'tie_word_embeddings' must be true or false, got {self.tie_word_embeddings!r}")
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
        for key, (allowed, why) in UNSUPPORTED_OFFICIAL.items():
            if not allowed(raw.get(key)):
                raise ConfigError(f"config key '{key}' = {raw[key]!r} is not supported: {why}")
        values = {**{k: v for k, v in OFFICIAL_DEFAULTS.items() if k in known}, **raw}
        kwargs = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in raw.items() if k not in known}
        for key, aliases in (("attention_type", ATTENTION_ALIASES), ("hidden_act", HIDDEN_ACT_ALIASES)):
            if isinstance(kwargs[key], str):
                kwargs[key] = aliases.get(kwargs[key], kwargs[key])
        if kwargs["ffn_type"] == "block":  # 3-D expert tensors; checkpoint IO reshapes them to block_linear
            kwargs["ffn_type"] = "block_linear"
        # num_key_value_heads: None -> num_attention_heads.  MLA: the official MLAAttention uses
        # hidden_size // num_attention_heads as the value head size (v_head_dim absent -> that).
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if kwargs["attention_type"] == "mla" and raw.get("v_head_dim") is None:
            d, heads = kwargs["hidden_size"], kwargs["num_attention_heads"]
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (d, heads))
            kwargs["v_head_dim"] = d // heads if ok else None
        if kwargs.get("rope_theta") is None:
            kwargs["rope_theta"] = 10000.0  # null: the official rotary default
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
