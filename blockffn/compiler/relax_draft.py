"""The EAGLE draft head as a Relax module: its own small library next to the target's (``ARTIFACT/draft``).

Same math as `blockffn.model.draft` (see its docstring), split into the functions MLC's EAGLE runtime calls:

* ``fuse_embed_hidden_states(e, h)``  = fc([RMSNorm_1(e) ; RMSNorm_2(h)]); ``e`` is the *target's* scaled
  embedding (the runtime embeds with the target library, so the draft stores no embedding table);
* ``prefill_to_last_hidden_states(x)`` = the decoder layer over the paged draft cache (committed slots);
* ``batch_verify_to_last_hidden_states(x)`` = the same body under a token-tree attention mask (draft trees);
* ``get_logits(f)``                    = lm_head(f / logit_input_scale), lm_head = the target head's rows
  ``d2t`` (copied into the draft's weights at compile time; no final norm, as the official draft).
"""

from __future__ import annotations

from tvm import tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from blockffn.compiler.relax_model import GQAAttention, MLAAttention, RMSNorm, paged_kv_cache
from blockffn.model.draft import DraftConfig


class SwiGLU(nn.Module):
    def __init__(self, d: int, inter: int, dtype: str):
        self.gate_proj = nn.Linear(d, inter, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(d, inter, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(inter, d, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(op.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """Attention of the target's kind with no input norm, then post-attention RMSNorm + dense SwiGLU."""

    def __init__(self, cfg: DraftConfig, dtype: str):
        attn = MLAAttention if cfg.attention_type == "mla" else GQAAttention
        self.self_attn = attn(cfg.attention_config(), 0, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.residual_scale = cfg.residual_scale

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        a = x + self.self_attn(x, kv) * self.residual_scale
        return a + self.mlp(self.post_attention_layernorm(a)) * self.residual_scale


class RelaxEagleDraft(nn.Module):
    def __init__(self, cfg: DraftConfig, dtype: str = "float32"):
        self.cfg, self.dtype = cfg, dtype
        d = cfg.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=cfg.bias, dtype=dtype)
        self.input_norm1 = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.input_norm2 = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.layers = nn.ModuleList([DraftLayer(cfg, dtype)])
        self.lm_head = nn.Linear(d, cfg.draft_vocab_size, bias=False, dtype=dtype)

    def fuse_embed_hidden_states(self, input_embed: Tensor, hidden_states: Tensor) -> Tensor:
        return self.fc(op.concat([self.input_norm1(input_embed), self.input_norm2(hidden_states)], dim=-1))

    def prefill_to_last_hidden_states(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self.layers[0](input_embed, paged_kv_cache), paged_kv_cache

    def batch_verify_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self.layers[0](input_embeds, paged_kv_cache), paged_kv_cache

    def get_logits(self, hidden_states: Tensor) -> Tensor:
        logits = self.lm_head(hidden_states * (1.0 / self.cfg.logit_input_scale))
        return logits.astype("float32") if logits.dtype != "float32" else logits

    def create_tir_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                                  prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                                  support_sliding_window: tirx.Var) -> PagedKVCache:
        return paged_kv_cache(self.cfg.attention_config(), self.dtype, self._target, max_batch_size,
                              max_total_seq_len, prefill_chunk_size, page_size, support_sliding_window)

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        d, dt = self.cfg.hidden_size, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        seq = nn.spec.Tensor([1, "seq_len", d], dt)
        return nn.spec.ModuleSpec.from_raw({
            "fuse_embed_hidden_states": {"input_embed": seq, "hidden_states": seq, "$": packed},
            "prefill_to_last_hidden_states": {"input_embed": seq, "paged_kv_cache": kv, "$": packed},
            "batch_verify_to_last_hidden_states": {"input_embeds": seq, "paged_kv_cache": kv, "$": packed},
            "get_logits": {"hidden_states": nn.spec.Tensor(["seq_len", d], dt), "$": packed},
            "create_tir_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"}},
        }, self)


def export_draft(cfg: DraftConfig, dtype: str, target) -> tuple:
    """(IRModule, [(param name, nn.Parameter)]) of the draft library."""
    model = RelaxEagleDraft(cfg, dtype)
    model._target = target
    mod, named_params, _ = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    return mod, named_params
