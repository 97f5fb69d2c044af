"""One decoder layer (MLA and GQA) and the whole-model scalings against an independent numpy re-implementation."""

import math

import numpy as np
import torch

from blockffn.model import BlockFFNForCausalLM
from tests.conftest import small_config


def np_rmsnorm(x, w, eps):
    return w * (x / np.sqrt((x**2).mean(-1, keepdims=True) + eps))


def np_rope(x, pos, theta):
    """Rotate-half RoPE on the last dim of x [T, ..., D] at integer positions pos [T]."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = pos[:, None] * inv[None]  # [T, D/2]
    cos, sin = np.cos(ang), np.sin(ang)
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (D // 2,)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_causal_attention(q, k, v, scale):
    """q [T, H, Dq], k [T, H, Dq], v [T, H, Dv] -> [T, H*Dv]"""
    T = q.shape[0]
    s = np.einsum("thd,shd->hts", q, k) * scale
    s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, -1)


def np_mla(x, W, cfg, pos):
    H, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    q = np_rmsnorm(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], 1e-6) @ W["q_b_proj.weight"].T
    q = q.reshape(len(x), H, nope + rope)
    ckv = x @ W["kv_a_proj_with_mqa.weight"].T
    c, k_pe = ckv[:, : cfg.kv_lora_rank], ckv[:, cfg.kv_lora_rank:]
    kv = (np_rmsnorm(c, W["kv_a_layernorm.weight"], 1e-6) @ W["kv_b_proj.weight"].T).reshape(len(x), H, -1)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    q_pe = np_rope(q[..., nope:], pos, cfg.rope_theta)
    k_pe = np_rope(k_pe, pos, cfg.rope_theta)
    qq = np.concatenate([q[..., :nope], q_pe], -1)
    kk = np.concatenate([k_nope, np.repeat(k_pe[:, None], H, axis=1)], -1)
    return np_causal_attention(qq, kk, v, 1 / math.sqrt(nope + rope)) @ W["o_proj.weight"].T


def np_gqa(x, W, cfg, pos):
    H, KVH, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.gqa_head_dim
    q = np_rope((x @ W["q_proj.weight"].T).reshape(len(x), H, hd), pos, cfg.rope_theta)
    k = np_rope((x @ W["k_proj.weight"].T).reshape(len(x), KVH, hd), pos, cfg.rope_theta)
    v = (x @ W["v_proj.weight"].T).reshape(len(x), KVH, hd)
    k, v = np.repeat(k, H // KVH, axis=1), np.repeat(v, H // KVH, axis=1)
    return np_causal_attention(q, k, v, 1 / math.sqrt(hd)) @ W["o_proj.weight"].T


def np_block_ffn(x, W, cfg):
    a0 = x @ W["router_proj.weight"].T
    a1 = np.maximum(a0, 0)
    g = a1 / np.sqrt((a1**2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * W["router_norm.weight"]
    out = np.zeros_like(x)
    De = cfg.expert_size
    for e in range(cfg.num_experts):  # expert by expert, straight from the block_linear layout
        up = W["up_proj"][e * De:(e + 1) * De]  # [De, d]
        down = W["down_proj"][:, e * De:(e + 1) * De]  # [d, De]
        z = x @ up.T
        out += g[:, e:e + 1] * ((z / (1 + np.exp(-z))) @ down.T)
    return out, a0


def np_layer(h, W, cfg, pos):
    attn = np_mla if cfg.attention_type == "mla" else np_gqa
    Wa = {k[len("self_attn."):]: v for k, v in W.items() if k.startswith("self_attn.")}
    Wm = {k[len("mlp."):]: v for k, v in W.items() if k.startswith("mlp.")}
    scale = cfg.scale_depth / math.sqrt(cfg.num_hidden_layers)
    h = h + scale * attn(np_rmsnorm(h, W["input_layernorm.weight"], cfg.rms_norm_eps), Wa, cfg, pos)
    y, a0 = np_block_ffn(np_rmsnorm(h, W["post_attention_layernorm.weight"], cfg.rms_norm_eps), Wm, cfg)
    return h + scale * y, a0


def layer_weights(model, i):
    prefix = f"model.layers.{i}."
    return {k[len(prefix):]: v.double().numpy() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_decoder_layer_matches_numpy(small_model):
    cfg = small_model.config
    T = 11
    torch.manual_seed(3)
    h = torch.randn(1, T, cfg.hidden_size)
    pos = torch.arange(T)[None]
    layer = small_model.model.layers[0]
    with torch.no_grad():
        ours, a0 = layer(h, pos, torch.ones(1, 1, T, T, dtype=torch.bool).tril())
    ref, ref_a0 = np_layer(h[0].double().numpy(), layer_weights(small_model, 0), cfg, np.arange(T, dtype=np.float64))
    np.testing.assert_allclose(ours[0].numpy(), ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    np.testing.assert_allclose(a0[0].numpy(), ref_a0, rtol=0, atol=1e-5 * np.abs(ref_a0).max())


def test_whole_model_scalings_match_numpy(small_model):
    """Embedding x scale_emb, residual x scale_depth/sqrt(L), final hidden / (d/dim_model_base), untied head."""
    cfg = small_model.config
    ids = np.array([5, 17, 3, 99, 42, 7])
    sd = {k: v.double().numpy() for k, v in small_model.state_dict().items()}
    h = sd["model.embed_tokens.weight"][ids] * cfg.scale_emb
    for i in range(cfg.num_hidden_layers):
        h, _ = np_layer(h, layer_weights(small_model, i), cfg, np.arange(len(ids), dtype=np.float64))
    h = np_rmsnorm(h, sd["model.norm.weight"], cfg.rms_norm_eps) / (cfg.hidden_size / cfg.dim_model_base)
    ref = h @ sd["lm_head.weight"].T
    with torch.no_grad():
        ours = small_model(torch.from_numpy(ids)[None]).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_tied_head_uses_embedding():
    model = BlockFFNForCausalLM(small_config(tie_word_embeddings=True)).init_weights(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
