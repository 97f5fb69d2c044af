"""The BlockFFN causal LM in PyTorch: exactly the official MiniCPM-style model (research/blockffn.md §1–2).

Module and parameter names mirror the official HF checkpoint (``model.layers.i.mlp.up_proj`` is a raw parameter,
no ``.weight``), so ``state_dict()`` *is* the checkpoint.  This model is the numerical reference for everything
the compiler builds; it favours clarity over speed, except for the union-sparse FFN, which exists to prove that
computing only the union of active experts is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from blockffn.model.config import BlockFFNConfig


class RMSNorm(nn.Module):
    """MiniCPM RMSNorm: variance in fp32, scale the input, cast back, then multiply by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ------------------------------------------------------------------------------------------------ RoPE
def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, T, dim] in fp32 for rotate-half (NeoX) RoPE at the given integer positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [B, T, D].  Computed in fp32 as the official code does."""
    cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


# ------------------------------------------------------------------------------------------------ KV cache
@dataclass
class KVCache:
    """Per-layer keys/values [B, H, S, D] for incremental decoding with the PyTorch model."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def truncate(self, length: int) -> None:
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]


def _attend(q, k, v, mask, scale):
    """q [B,H,Tq,Dq], k [B,Hkv,Tk,Dq], v [B,Hkv,Tk,Dv] (H a multiple of Hkv: grouped-query attention); mask bool
    [B,1,Tq,Tk] (True = attend).

    Under ONNX export the attention is spelled out with matmuls, each group of query heads against its shared
    key head: the exporter's SDPA decomposition folds batch and heads into one axis through a data-dependent
    reshape, and ``repeat_interleave`` becomes an ``Expand``, both of which ONNX importers (TVM's) cannot resolve."""
    b, h, t, _ = q.shape
    kvh = k.shape[1]
    if torch.onnx.is_in_onnx_export():
        qg = q.reshape(b, kvh, h // kvh, t, q.shape[-1])  # [B, Hkv, group, Tq, D]
        scores = torch.matmul(qg, k.transpose(-1, -2).unsqueeze(2)) * scale
        scores = scores.masked_fill(~mask.unsqueeze(1), torch.finfo(scores.dtype).min)
        o = torch.matmul(torch.softmax(scores, dim=-1), v.unsqueeze(2))
        return o.reshape(b, h, t, v.shape[-1])
    if kvh != h:
        k, v = k.repeat_interleave(h // kvh, dim=1), v.repeat_interleave(h // kvh, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ------------------------------------------------------------------------------------------------ attention
class MLAAttention(nn.Module):
    """Multi-head latent attention of the official Small..XLarge models (MHA-style per-head k_nope/v, shared k_pe)."""

    def __init__(self, cfg: BlockFFNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.h = cfg.num_attention_heads
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_lora = cfg.kv_lora_rank
        self.theta = cfg.rope_theta
        d = cfg.hidden_size
        self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.h * (self.nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.h * self.v_dim, d, bias=False)
        self.scale = (self.nope + self.rope) ** -0.5

    def forward(self, x, positions, mask, cache: KVCache | None = None):
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, t, self.h, self.nope + self.rope)
        q = q.transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        ckv = self.kv_a_proj_with_mqa(x)
        c, k_pe = ckv.split([self.kv_lora, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c)).view(b, t, self.h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        cos, sin = rope_cos_sin(positions, self.rope, self.theta)
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.view(b, 1, t, self.rope), cos, sin)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(b, self.h, t, self.rope)], dim=-1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        o = _attend(q, k, v, mask, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.v_dim))


class GQAAttention(nn.Module):
    """Grouped-query attention of the 2.8B acceleration model (plain q/k/v/o projections, rotate-half RoPE)."""

    def __init__(self, cfg: BlockFFNConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.gqa_head_dim
        self.theta = cfg.rope_theta
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.kvh * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.kvh * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=False)
        self.scale = self.hd ** -0.5

    def forward(self, x, positions, mask, cache: KVCache | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kvh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kvh, self.hd).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, self.hd, self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        o = _attend(q, k, v, mask, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.h * self.hd))


# ------------------------------------------------------------------------------------------------ BlockFFN
class BlockFFN(nn.Module):
    """ReLU router + RMSNorm-over-experts gate, non-gated SiLU experts in the ``block_linear`` layout.

    Expert e owns rows ``[e*De, (e+1)*De)`` of ``up_proj [E*De, d]`` and the same columns of
    ``down_proj [d, E*De]``.  An expert is active for a token iff its pre-norm ReLU output is > 0.
    """

    def __init__(self, cfg: BlockFFNConfig):
        super().__init__()
        self.E, self.De, self.eps = cfg.num_experts, cfg.expert_size, cfg.rms_norm_eps
        d = cfg.hidden_size
        self.router_proj = nn.Linear(d, self.E, bias=False)
        self.router_norm = RMSNorm(self.E, cfg.rms_norm_eps)
        self.up_proj = nn.Parameter(torch.empty(self.E * self.De, d))
        self.down_proj = nn.Parameter(torch.empty(d, self.E * self.De))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (router logits A0 [..., E] (pre-ReLU), gate g [..., E]); g == 0 exactly where A0 <= 0."""
        a0 = self.router_proj(x)
        return a0, self.router_norm(F.relu(a0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense reference: every expert computed, inactive ones multiplied by an exact-zero gate."""
        a0, g = self.route(x)
        h = F.silu(F.linear(x, self.up_proj))
        h = (h.unflatten(-1, (self.E, self.De)) * g.unsqueeze(-1)).flatten(-2)
        return F.linear(h, self.down_proj), a0

    def forward_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Union-sparse: compute only experts active for at least one token of this call (exact)."""
        a0, g = self.route(x)
        shape = x.shape
        xs, gs = x.reshape(-1, shape[-1]), g.reshape(-1, self.E)
        union = (a0.reshape(-1, self.E) > 0).any(0).nonzero().squeeze(-1)
        if union.numel() == 0:
            return x.new_zeros(shape[:-1] + (self.down_proj.shape[0],)), a0
        w_up = self.up_proj.view(self.E, self.De, -1)[union]  # [U, De, d]
        w_down = self.down_proj.view(-1, self.E, self.De)[:, union]  # [d, U, De]
        h = F.silu(torch.einsum("td,ukd->tuk", xs, w_up)) * gs[:, union, None]
        y = torch.einsum("tuk,duk->td", h, w_down)
        return y.reshape(shape[:-1] + (y.shape[-1],)), a0


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BlockFFNConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        attn_cls = MLAAttention if cfg.attention_type == "mla" else GQAAttention
        self.self_attn = attn_cls(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = BlockFFN(cfg)
        self.residual_scale = cfg.residual_scale

    def forward(self, h, positions, mask, cache=None, sparse=False):
        h = h + self.self_attn(self.input_layernorm(h), positions, mask, cache) * self.residual_scale
        x = self.post_attention_layernorm(h)
        y, a0 = self.mlp.forward_sparse(x) if sparse else self.mlp(x)
        return h + y * self.residual_scale, a0


class BlockFFNModel(nn.Module):
    def __init__(self, cfg: BlockFFNConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, T, V]
    router_logits: list  # per layer, A0 [B, T, E] (pre-ReLU)
    hidden: torch.Tensor  # final-norm hidden state [B, T, d] (what an EAGLE draft consumes)


def build_attention_mask(doc_ids: torch.Tensor | None, q_len: int, k_len: int, batch: int,
                         device) -> torch.Tensor:
    """Bool mask [B, 1, Tq, Tk]: causal (queries are the last Tq of Tk positions), and within one document."""
    qi = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    ki = torch.arange(k_len, device=device)[None, :]
    mask = (ki <= qi)[None, None].expand(batch, 1, q_len, k_len)
    if doc_ids is not None:
        same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        mask = mask & same
    return mask


def default_positions_and_mask(input_ids: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None,
                               mask: torch.Tensor | None, doc_ids: torch.Tensor | None = None):
    """Positions from the cache length onwards and the causal (document) mask, unless given explicitly."""
    b, t = input_ids.shape
    past = cache.length if cache is not None else 0
    if positions is None:
        positions = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
    if mask is None:
        mask = build_attention_mask(doc_ids, t, past + t, b, input_ids.device)
    return positions, mask


class BlockFFNForCausalLM(nn.Module):
    def __init__(self, cfg: BlockFFNConfig):
        super().__init__()
        self.config = cfg.validate()
        self.model = BlockFFNModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- initialisation (µP, research/blockffn.md §4.5) ----------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "BlockFFNForCausalLM":
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cfg = self.config
        std = cfg.initializer_range / math.sqrt(cfg.hidden_size / cfg.dim_model_base)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "embed_tokens" in name or name.startswith("lm_head"):
                p.copy_(torch.randn(p.shape, generator=gen) * cfg.initializer_range)
            elif name.endswith("kv_b_proj.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)  # official quirk: kv_up_proj std 0.02
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, cache: KVCache | None = None, sparse: bool = False,
                mask: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, T].  ``positions`` default to the cache length onwards; ``doc_ids`` [B, T] restrict
        attention to tokens of the same packed document; ``mask`` (bool [B,1,T,past+T]) overrides both, e.g. for
        tree verification.  ``sparse`` computes each FFN over the union of the experts active in this call."""
        cfg = self.config
        positions, mask = default_positions_and_mask(input_ids, cache, positions, mask, doc_ids)
        h = self.model.embed_tokens(input_ids) * cfg.scale_emb
        router_logits = []
        for layer in self.model.layers:
            h, a0 = layer(h, positions, mask, cache, sparse)
            router_logits.append(a0)
        hidden = self.model.norm(h)
        logits = self.lm_head(hidden / cfg.logit_input_scale)
        return CausalLMOutput(logits=logits, router_logits=router_logits, hidden=hidden)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                n -= self.lm_head.weight.numel()
        return n
