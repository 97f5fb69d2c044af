"""EAGLE draft head for a BlockFFN target (research/blockffn.md §5.2): config, PyTorch module, HF-format IO.

The draft is one decoder layer that predicts the target's *next* final-norm hidden state from the current one and
the next token.  The exact computation, for a draft slot j that pairs the target's final-norm hidden ``h_j`` (of
the token at position j) with the token ``x_{j+1}`` that follows it::

    e   = E_target[x_{j+1}] * scale_emb                      # the target's embedding, shared and frozen
    x   = fc([RMSNorm_1(e) ; RMSNorm_2(h_j)])                 # fc: 2d -> d with bias; input_norm1 / input_norm2
    a   = x + r * Attn(x, rope position j)                    # no input norm before attention (official: Skip);
                                                              # Attn is the target's kind (MLA or GQA)
    f   = a + r * SwiGLU(RMSNorm_post(a))                     # dense SwiGLU: down(silu(gate(y)) * up(y))
    logits = W_head[d2t] @ (f / (hidden_size / dim_model_base))   # the target's LM head rows, NO final norm

with ``r = scale_depth / sqrt(num_hidden_layers)`` (MiniCPM residual scaling; one layer, so r = scale_depth).
``f`` estimates ``h_{j+1}`` and is what the next draft step receives as its ``h`` (EAGLE feeds its own output
back); once the target has verified tokens, their true final-norm hidden states replace the estimates.  The
draft's KV cache holds one entry per slot; slot j sits at RoPE position j (the position of ``h_j``), so a tree node
at target position p is drafted in the slot at position p - 1.

Checkpoint layout follows the EAGLE-1/2 files FR-Spec loads for ``BlockFFN-3B-SFT-EAGLE`` (no ``model.`` prefix):
``fc.weight [d, 2d]``, ``fc.bias [d]``, ``input_norm1.weight``, ``input_norm2.weight`` (the names of the MiniCPM
EAGLE drafts), ``layers.0.self_attn.*`` (the target's attention names), ``layers.0.post_attention_layernorm.weight``,
``layers.0.mlp.{gate,up,down}_proj.weight``.  The embedding and LM head are the target's and are not stored; a
reduced frequency-ranked vocabulary (FR-Spec) stores ``d2t [draft_vocab_size]`` int64, the *absolute* target token
id of every draft-vocabulary row (FR-Spec's ``token_id_remap``, not EAGLE-3's offsets).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blockffn.errors import CheckpointError, ConfigError
from blockffn.model.checkpoint import (check_named_shapes, expected_shapes, read_tensors,
                                       resolve_dtype, write_safetensors)
from blockffn.outputs import atomic_output_dir
from blockffn.model.config import ATTENTION_ALIASES, BlockFFNConfig
from blockffn.model.modeling import GQAAttention, KVCache, MLAAttention, RMSNorm, default_positions_and_mask

DRAFT_ARCHITECTURE = "EagleMiniCPMForCausalLM"
# attention keys copied from the target (the draft's own attention has the target's shape)
ATTENTION_KEYS = ("attention_type", "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "head_dim", "rope_theta",
                  "max_position_embeddings")
SCALING_KEYS = ("scale_emb", "dim_model_base", "scale_depth", "rms_norm_eps")


@dataclass
class DraftConfig:
    """``config.json`` of a draft head (official HF key names of the MiniCPM family plus EAGLE's ``bias`` and
    EAGLE-3's ``draft_vocab_size``)."""

    hidden_size: int = 256
    vocab_size: int = 4096  # the target's vocabulary
    draft_vocab_size: int = 4096  # rows of the draft LM head; < vocab_size means a d2t map is stored
    intermediate_size: int = 1024  # SwiGLU width
    num_hidden_layers: int = 1
    bias: bool = True  # fc bias (EAGLE)
    hidden_act: str = "silu"
    attention_type: str = "mla"
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    q_lora_rank: int = 128
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    head_dim: int | None = None
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    scale_emb: float = 12.0
    dim_model_base: int = 256
    scale_depth: float = 1.4
    rms_norm_eps: float = 1e-5
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_target(cls, target: BlockFFNConfig, draft_vocab_size: int | None = None,
                    intermediate_size: int | None = None) -> "DraftConfig":
        """A draft shaped for ``target``: its attention kind and sizes, its scalings, SwiGLU width E·De."""
        keys = {k: getattr(target, k) for k in ATTENTION_KEYS + SCALING_KEYS}
        return cls(hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                   draft_vocab_size=draft_vocab_size or target.vocab_size,
                   intermediate_size=intermediate_size or target.ffn_width, **keys).validate()

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_input_scale(self) -> float:
        return self.hidden_size / self.dim_model_base

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    def attention_config(self) -> BlockFFNConfig:
        """A target-style config carrying the draft's attention shape (so modeling.py's classes build it)."""
        keys = {k: getattr(self, k) for k in ATTENTION_KEYS + SCALING_KEYS}
        return BlockFFNConfig(hidden_size=self.hidden_size, vocab_size=self.vocab_size, num_hidden_layers=1,
                              **keys).validate()

    def validate(self) -> "DraftConfig":
        if self.num_hidden_layers != 1:
            raise ConfigError(f"draft config key 'num_hidden_layers' must be 1 (one EAGLE layer), got "
                              f"{self.num_hidden_layers!r}")
        for key in ("hidden_size", "vocab_size", "draft_vocab_size", "intermediate_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"draft config key '{key}' must be a positive integer, got {v!r}")
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(f"draft config key 'draft_vocab_size' ({self.draft_vocab_size}) exceeds "
                              f"'vocab_size' ({self.vocab_size})")
        if self.hidden_act != "silu":
            raise ConfigError(f"draft config key 'hidden_act' must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        self.attention_config()
        return self

    def to_hf_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if self.head_dim is None:
            d.pop("head_dim")
        d["architectures"] = [DRAFT_ARCHITECTURE]
        d["model_type"] = "minicpm"
        out = dict(self.extra)
        out.update(d)
        return dict(sorted(out.items()))

    @classmethod
    def load(cls, path: str | Path) -> "DraftConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found (a draft folder needs config.json)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(raw, dict) or DRAFT_ARCHITECTURE not in (raw.get("architectures") or []):
            raise ConfigError(f"{path}: not a draft head config (architectures must list {DRAFT_ARCHITECTURE}); "
                              f"is this the target model folder?")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in raw.items() if k not in known and k not in ("architectures", "model_type")}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if isinstance(kwargs.get("attention_type"), str):
            kwargs["attention_type"] = ATTENTION_ALIASES.get(kwargs["attention_type"], kwargs["attention_type"])
        try:
            cfg = cls(**kwargs, extra=extra)
        except TypeError as e:  # pragma: no cover - dataclass init only fails on programming errors
            raise ConfigError(f"{path}: invalid draft config ({e})") from None
        return cfg.validate()


def expected_draft_shapes(cfg: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a draft checkpoint with its shape, derived from the config alone."""
    d, inter = cfg.hidden_size, cfg.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"fc.weight": (d, 2 * d), "input_norm1.weight": (d,),
                                          "input_norm2.weight": (d,)}
    if cfg.bias:
        shapes["fc.bias"] = (d,)
    for name, shape in expected_shapes(cfg.attention_config()).items():
        if name.startswith("model.layers.0.self_attn."):
            shapes[name[len("model."):]] = shape
    shapes["layers.0.post_attention_layernorm.weight"] = (d,)
    shapes["layers.0.mlp.gate_proj.weight"] = (inter, d)
    shapes["layers.0.mlp.up_proj.weight"] = (inter, d)
    shapes["layers.0.mlp.down_proj.weight"] = (d, inter)
    if cfg.reduced_vocab:
        shapes["d2t"] = (cfg.draft_vocab_size,)
    return shapes


class SwiGLU(nn.Module):
    def __init__(self, d: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """Attention (target kind, no input norm) + post-attention RMSNorm + dense SwiGLU, MiniCPM residual scale."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        attn_cfg = cfg.attention_config()
        self.self_attn = (MLAAttention if cfg.attention_type == "mla" else GQAAttention)(attn_cfg, 0)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.residual_scale = cfg.residual_scale

    def forward(self, x, positions, mask, cache=None):
        a = x + self.self_attn(x, positions, mask, cache) * self.residual_scale
        return a + self.mlp(self.post_attention_layernorm(a)) * self.residual_scale


@dataclass
class DraftOutput:
    hidden: torch.Tensor  # [B, T, d] estimate of the target's next final-norm hidden state (fed back as h)
    logits: torch.Tensor  # [B, T, draft_vocab_size]


class EagleDraftHead(nn.Module):
    """The EAGLE draft (module docstring has the math).  Call :meth:`bind_target` before :meth:`forward`."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.config = cfg.validate()
        d = cfg.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=cfg.bias)
        self.input_norm1 = RMSNorm(d, cfg.rms_norm_eps)
        self.input_norm2 = RMSNorm(d, cfg.rms_norm_eps)
        self.layers = nn.ModuleList([DraftLayer(cfg)])
        if cfg.reduced_vocab:
            self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size, dtype=torch.long))
        else:
            self.d2t = None
        self._shared: dict[str, torch.Tensor] = {}  # the target's embedding and head rows; not parameters here

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> "EagleDraftHead":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if "norm" in name:  # input_norm1/2, post_attention_layernorm, the MLA latent norms
                p.fill_(1.0)
            elif name == "fc.bias":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def bind_target(self, target) -> "EagleDraftHead":
        """Share the target's embedding and LM head (rows ``d2t`` of it for a reduced vocabulary)."""
        tc, dc = target.config, self.config
        if (tc.hidden_size, tc.vocab_size) != (dc.hidden_size, dc.vocab_size):
            raise CheckpointError(
                f"draft head was made for a target with hidden_size {dc.hidden_size} and vocab_size "
                f"{dc.vocab_size}, but this target has hidden_size {tc.hidden_size} and vocab_size {tc.vocab_size}; "
                f"train a draft for it with `blockffn train-draft --target-model DIR`")
        head = target.lm_head.weight
        self._shared = {"embed": target.model.embed_tokens.weight,
                        "head": head[self.d2t] if self.d2t is not None else head}
        return self

    def target_token_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target vocabulary ids of draft-vocabulary rows."""
        return self.d2t[draft_ids] if self.d2t is not None else draft_ids

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None) -> DraftOutput:
        """input_ids [B, T] (token x_{j+1} of each slot), hidden [B, T, d] (h_j).  Positions default to the cache
        length onwards; ``mask`` (bool [B, 1, T, past+T]) overrides the causal mask, e.g. for a draft tree."""
        if not self._shared:
            raise RuntimeError("EagleDraftHead.bind_target(target) must be called before forward")
        cfg = self.config
        positions, mask = default_positions_and_mask(input_ids, cache, positions, mask)
        e = F.embedding(input_ids, self._shared["embed"]) * cfg.scale_emb
        x = self.fc(torch.cat([self.input_norm1(e), self.input_norm2(hidden.to(e.dtype))], dim=-1))
        f = self.layers[0](x, positions, mask, cache)
        logits = F.linear(f / cfg.logit_input_scale, self._shared["head"])
        return DraftOutput(hidden=f, logits=logits)


# ---------------------------------------------------------------------------------------------------------- IO
def save_draft(draft: EagleDraftHead, folder: str | Path, dtype: str | torch.dtype = "float32",
               extra_files: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically (the shared embedding / head are not stored)."""
    dt = resolve_dtype(dtype)
    cfg = dataclasses.replace(draft.config, torch_dtype={torch.float32: "float32", torch.float16: "float16",
                                                         torch.bfloat16: "bfloat16"}[dt])
    tensors = {k: (v.to(dt) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in draft.state_dict().items()}
    with atomic_output_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        write_safetensors(tensors, tmp, None)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(folder)


def load_draft(folder: str | Path, target=None, dtype: str | torch.dtype = "float32") -> EagleDraftHead:
    """Load a draft folder, check every tensor against its config, and bind it to ``target`` when given."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a draft folder")
    cfg = DraftConfig.load(folder / "config.json")
    tensors = read_tensors(folder)
    check_named_shapes(tensors, expected_draft_shapes(cfg), str(folder), integer=("d2t",))
    if cfg.reduced_vocab:
        d2t = tensors["d2t"]
        if d2t.min() < 0 or d2t.max() >= cfg.vocab_size or len(torch.unique(d2t)) != len(d2t):
            raise CheckpointError(f"{folder}: tensor 'd2t' must hold distinct token ids in [0, {cfg.vocab_size})")
    dt = resolve_dtype(dtype)
    draft = EagleDraftHead(cfg).to(dt)
    draft.load_state_dict({k: (v.to(dt) if v.is_floating_point() else v.long()) for k, v in tensors.items()})
    if target is not None:
        draft.bind_target(target)
    return draft.eval()


def bundled_draft_path(model_dir: str | Path) -> Path:
    """Where a model folder keeps its draft head (``MODEL/draft``), e.g. the bundled model's."""
    return Path(model_dir) / "draft"
