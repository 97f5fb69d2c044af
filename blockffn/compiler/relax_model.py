"""The BlockFFN model in `tvm.relax.frontend.nn`, exporting the MLC-LLM model-library functions.

Parameter names equal the official HF checkpoint names (``model.layers.i.mlp.up_proj`` …), so the weights need
no renaming; the only layout change is inside the graph: MLA's q/k are assembled as ``[rope | nope]`` per head so
that the paged KV cache's RoPE (which rotates the first ``rotary_dim`` features, rotate-half) touches exactly the
rope features, and v is zero-padded to the q/k head size when they differ (as the official training does for
flash-attention).  A permutation of features applied to both q and k leaves q·k unchanged.

Each BlockFFN layer is emitted as its own Relax function (``BlockFFN`` subroutine) so that the sparse-lowering
passes can find and replace it; here it computes densely.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache

from blockffn.artifacts.q4 import GroupQuant
from blockffn.compiler.relax_quant import QEmbedding, QExperts, QLinear, down_index, q4_matmul, up_index
from blockffn.artifacts.layout import DOWN_PROJ_TRANSPOSED, to_library_layout  # noqa: F401 - re-exported
from blockffn.compiler.relax_kv_cache import cache_layout, paged_kv_cache  # noqa: F401 - re-exported
from blockffn.model.config import BlockFFNConfig
from blockffn.relax_passes.lower_sparse_ffn import BLOCKFFN_SUBROUTINE

# Compile-time weight layout transform, recorded in the artifact manifest: HF `mlp.down_proj` [d, E*De] is stored
# transposed as [E*De, d] (expert-major slabs, like `mlp.up_proj`).


def linear(in_features: int, out_features: int, dtype: str, scheme: GroupQuant | None = None) -> nn.Module:
    """A bias-free linear layer: nn.Linear, or its q4 twin when the model is group-quantized."""
    if scheme is not None:
        return QLinear(in_features, out_features, scheme)
    return nn.Linear(in_features, out_features, bias=False, dtype=dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: str):
        self.weight = nn.Parameter((dim,), dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return op.rms_norm(x, self.weight, axes=[-1], epsilon=self.eps)


class BlockFFN(nn.Module):
    """ReLU router -> RMSNorm gate over experts -> non-gated SiLU experts (block_linear layout), dense.

    ``forward`` emits a call to a private Relax function named ``BlockFFN*`` that takes (x, router weight,
    router-norm weight, up_proj, down_proj), or with a q4 ``scheme`` (x, router weight, router-norm weight,
    up q_weight, up q_scale, down q_weight, down q_scale); the router always stays in full precision.  nn's own ``define_subroutine`` cannot be used: with
    ``param_mode="packed"`` the weights are dataflow variables, which may not become function parameters.
    """

    def __init__(self, cfg: BlockFFNConfig, dtype: str, scheme: GroupQuant | None = None):
        self.E, self.De, self.d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
        self.router_proj = nn.Linear(self.d, self.E, bias=False, dtype=dtype)
        self.router_norm = RMSNorm(self.E, cfg.rms_norm_eps, dtype)
        self.scheme = scheme
        if scheme is not None:  # expert-major q4 slabs: up [E, De, d/8], down [E, d, De/8]
            self.up_proj = QExperts(self.E, self.De, self.d, scheme)
            self.down_proj = QExperts(self.E, self.d, self.De, scheme)
            return
        self.up_proj = nn.Parameter((self.E * self.De, self.d), dtype)  # HF layout: expert e = rows e*De..
        # Stored transposed (see DOWN_PROJ_TRANSPOSED): [E*De, d], so each expert is one contiguous [De, d] slab
        # for both projections and a gathered expert is a single contiguous read.
        self.down_proj = nn.Parameter((self.E * self.De, self.d), dtype)

    def dense(self, x: Tensor, w_router: Tensor, w_norm: Tensor, *experts: Tensor) -> Tensor:
        b, s, _ = x.shape
        E, De, d = self.E, self.De, self.d
        a0 = op.matmul(x, op.permute_dims(w_router))  # [b, s, E] router logits
        gate = op.rms_norm(op.relu(a0), w_norm, axes=[-1], epsilon=self.router_norm.eps)  # 0 where a0 <= 0
        if self.scheme is None:
            w_up, w_down = experts
            h = op.silu(op.matmul(x, op.permute_dims(w_up)))  # [b, s, E*De]
        else:
            up_q, up_s, down_q, down_s = experts
            h = op.silu(q4_matmul(x, up_q, up_s, E * De, d, up_index(De), name="q4_expert_up"))
        h = op.reshape(op.reshape(h, (b, s, E, De)) * op.reshape(gate, (b, s, E, 1)), (b, s, E * De))
        if self.scheme is None:
            return op.matmul(h, w_down)
        return q4_matmul(h, down_q, down_s, d, E * De, down_index(De), name="q4_expert_down")

    def router_stats(self, x: Tensor) -> Tensor:
        """int32 [1, 2]: (experts active for any token of the call = the sparse path's union size, active
        (token, expert) pairs).  Same router logits and activity test (> 0) as the lowering."""
        a0 = op.matmul(x, op.permute_dims(self.router_proj.weight))
        active = op.astype(op.greater(a0, op.zeros((1,), a0.dtype)), "int32")  # [b, s, E]
        union = op.sum(op.max(active, axis=[0, 1]))
        pairs = op.sum(active)
        return op.reshape(op.concat([op.reshape(union, (1,)), op.reshape(pairs, (1,))], dim=0), (1, 2))

    def _expert_args(self) -> tuple[list, list[str]]:
        if self.scheme is None:
            return [self.up_proj._expr, self.down_proj._expr], ["up_proj", "down_proj"]
        return ([self.up_proj.q_weight._expr, self.up_proj.q_scale._expr, self.down_proj.q_weight._expr,
                 self.down_proj.q_scale._expr], ["up_q_weight", "up_q_scale", "down_q_weight", "down_q_scale"])

    def forward(self, x: Tensor) -> Tensor:
        bb = relax.BlockBuilder.current()
        expert_args, expert_names = self._expert_args()
        args = [x._expr, self.router_proj.weight._expr, self.router_norm.weight._expr, *expert_args]
        gvar = _subroutine_for(bb, args)
        if gvar is None:
            names = ["x", "router_proj_weight", "router_norm_weight", *expert_names]
            params = [relax.Var(n, a.ty) for n, a in zip(names, args)]
            with bb.function(BLOCKFFN_SUBROUTINE, params, private=True):
                with bb.dataflow():
                    out = self.dense(*[Tensor(_expr=p) for p in params])
                    out = bb.emit_output(out._expr)
                gvar = bb.emit_func_output(out)
            mod = bb.get()
            mod.update_func(gvar, relax.utils.copy_with_new_vars(mod[gvar]))
        return Tensor(_expr=bb.emit(relax.Call(gvar, args)))


def _subroutine_for(bb: relax.BlockBuilder, args) -> tvm.ir.GlobalVar | None:
    """The BlockFFN function the builder's module already holds for arguments of these types: one per shape, every
    layer calls it with its own weights (looked up in the module, so no state outlives an export)."""
    want = relax.TupleType([a.ty for a in args])
    for gv, f in bb.get().functions.items():
        if (gv.name_hint.startswith(BLOCKFFN_SUBROUTINE) and isinstance(f, relax.Function)
                and tvm_ffi.structural_equal(relax.TupleType([p.ty for p in f.params]), want, map_free_vars=True)):
            return gv
    return None


class SingleBlockFFN(nn.Module):
    """One BlockFFN layer with two entry points, ``dense`` and ``sparse``, over the same weights: after
    LowerBlockFFNSparse(["sparse"]) they are the two lowerings of one layer (used by tests and benchmarks).
    ``decode_entries`` adds ``dense_decode`` / ``sparse_decode`` with a static single token, shaped like a model's
    ``decode`` (static shapes get other schedules, e.g. dlight's GEMV on GPUs)."""

    def __init__(self, cfg: BlockFFNConfig, dtype: str = "float32", scheme: GroupQuant | None = None):
        self.mlp = BlockFFN(cfg, dtype, scheme)
        self.hidden, self.dtype = cfg.hidden_size, dtype

    def dense(self, x: Tensor) -> Tensor:
        return self.mlp(x)

    def sparse(self, x: Tensor) -> Tensor:
        return self.mlp(x)

    dense_decode, sparse_decode = dense, sparse

    def export(self, decode_entries: bool = False):
        """(IRModule, named params) with x: [1, n, d] for both entry points (and [1, 1, d] for the decode ones)."""
        packed = {"param_mode": "packed", "effect_mode": "none"}
        spec = {name: {"x": nn.spec.Tensor([1, "n", self.hidden], self.dtype), "$": packed}
                for name in ("dense", "sparse")}
        if decode_entries:
            spec.update({name: {"x": nn.spec.Tensor([1, 1, self.hidden], self.dtype), "$": packed}
                         for name in ("dense_decode", "sparse_decode")})
        return self.export_tvm(spec=spec)


class MLAAttention(nn.Module):
    def __init__(self, cfg: BlockFFNConfig, layer_id: int, dtype: str, scheme: GroupQuant | None = None):
        self.layer_id = layer_id
        self.h, self.nope, self.rope, self.v = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                                cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.kv_lora = cfg.kv_lora_rank
        self.head_dim = self.nope + self.rope  # cache head size (v padded up to it)
        d = cfg.hidden_size
        self.q_a_proj = linear(d, cfg.q_lora_rank, dtype, scheme)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype)
        self.q_b_proj = linear(cfg.q_lora_rank, self.h * self.head_dim, dtype, scheme)
        self.kv_a_proj_with_mqa = linear(d, self.kv_lora + self.rope, dtype, scheme)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, 1e-6, dtype)
        self.kv_b_proj = linear(self.kv_lora, self.h * (self.nope + self.v), dtype, scheme)
        self.o_proj = linear(self.h * self.v, d, dtype, scheme)

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        b, s, _ = x.shape
        q = op.reshape(self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))), (b, s, self.h, self.head_dim))
        q_nope, q_pe = op.split(q, [self.nope], axis=-1)
        c, k_pe = op.split(self.kv_a_proj_with_mqa(x), [self.kv_lora], axis=-1)
        kvb = op.reshape(self.kv_b_proj(self.kv_a_layernorm(c)), (b, s, self.h, self.nope + self.v))
        k_nope, v = op.split(kvb, [self.nope], axis=-1)
        k_pe = op.broadcast_to(op.reshape(k_pe, (b, s, 1, self.rope)), (b, s, self.h, self.rope))
        q = op.concat([q_pe, q_nope], dim=-1)
        k = op.concat([k_pe, k_nope], dim=-1)
        if self.v < self.head_dim:
            v = op.pad(v, [0, 0, 0, 0, 0, 0, 0, self.head_dim - self.v])
        qkv = op.concat([q, k, v], dim=2)
        o = kv.attention_with_fused_qkv(self.layer_id, qkv, self.h, sm_scale=self.head_dim ** -0.5)
        if self.v < self.head_dim:
            o = op.split(o, [self.v], axis=-1)[0]
        return self.o_proj(op.reshape(o, (b, s, self.h * self.v)))


class GQAAttention(nn.Module):
    def __init__(self, cfg: BlockFFNConfig, layer_id: int, dtype: str, scheme: GroupQuant | None = None):
        self.layer_id = layer_id
        self.h, self.kvh, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.gqa_head_dim
        d = cfg.hidden_size
        # q, k and v in one weight (layout.FUSED_QKV): one GEMV, and its output is already the cache's fused qkv
        self.qkv_proj = linear(d, (self.h + 2 * self.kvh) * self.head_dim, dtype, scheme)
        self.o_proj = linear(self.h * self.head_dim, d, dtype, scheme)

    def forward(self, x: Tensor, kv: PagedKVCache) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, s, self.h + 2 * self.kvh, self.head_dim))
        o = kv.attention_with_fused_qkv(self.layer_id, qkv, self.h, sm_scale=self.head_dim ** -0.5)
        return self.o_proj(op.reshape(o, (b, s, self.h * self.head_dim)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BlockFFNConfig, layer_id: int, dtype: str, scheme: GroupQuant | None = None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        attn = MLAAttention if cfg.attention_type == "mla" else GQAAttention
        self.self_attn = attn(cfg, layer_id, dtype, scheme)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = BlockFFN(cfg, dtype, scheme)
        self.residual_scale = cfg.residual_scale

    def forward(self, h: Tensor, kv: PagedKVCache, stats: list | None = None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), kv) * self.residual_scale
        x = self.post_attention_layernorm(h)
        if stats is not None:
            stats.append(self.mlp.router_stats(x))
        return h + self.mlp(x) * self.residual_scale


class Backbone(nn.Module):
    def __init__(self, cfg: BlockFFNConfig, dtype: str, scheme: GroupQuant | None = None):
        self.embed_tokens = (QEmbedding(cfg.vocab_size, cfg.hidden_size, scheme) if scheme is not None
                             else nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype))
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, dtype, scheme) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class RelaxBlockFFN(nn.Module):
    """The compiled model: the MLC-LLM function set over a paged KV cache."""

    def __init__(self, cfg: BlockFFNConfig, dtype: str = "float32", scheme: GroupQuant | None = None,
                 debug_counts: bool = False):
        self.cfg = cfg
        self.dtype = dtype
        self.scheme = scheme
        self.debug_counts = debug_counts
        self.model = Backbone(cfg, dtype, scheme)
        if not cfg.tie_word_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, dtype, scheme)

    # ------------------------------------------------------------------------------------------- pieces
    def _hidden(self, h: Tensor, kv: PagedKVCache, stats: list | None = None) -> Tensor:
        for layer in self.model.layers:
            h = layer(h, kv, stats)
        return self.model.norm(h)

    def _with_stats(self, h: Tensor, kv: PagedKVCache, logits: bool):
        """Debug builds (``--debug-counts``): the step's output plus per-layer router counts [L, 2]."""
        stats: list = []
        hidden = self._hidden(h, kv, stats)
        out = self._logits(hidden) if logits else hidden
        return out, op.concat(stats, dim=0), kv

    def decode_with_stats(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._with_stats(input_embed, paged_kv_cache, logits=True)

    def batch_verify_with_stats(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._with_stats(input_embeds, paged_kv_cache, logits=True)

    def decode_to_last_hidden_states_with_stats(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._with_stats(input_embed, paged_kv_cache, logits=False)

    def batch_verify_to_last_hidden_states_with_stats(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._with_stats(input_embeds, paged_kv_cache, logits=False)

    def _logits(self, hidden: Tensor) -> Tensor:
        hidden = hidden * (1.0 / self.cfg.logit_input_scale)
        if self.cfg.tie_word_embeddings and self.scheme is not None:
            logits = self.model.embed_tokens.lm_logits(hidden)
        elif self.cfg.tie_word_embeddings:
            logits = op.matmul(hidden, op.permute_dims(self.model.embed_tokens.weight))
        else:
            logits = self.lm_head(hidden)
        return logits.astype("float32") if logits.dtype != "float32" else logits

    # ------------------------------------------------------------------------------------------- MLC functions
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids) * self.cfg.scale_emb

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self._hidden(input_embed, paged_kv_cache)

        def last_token(x: te.Tensor):
            b, s, d = x.shape
            return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="index")

        hidden = op.tensor_expr_op(last_token, name_hint="index", args=[hidden])
        return self._logits(hidden), paged_kv_cache

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._hidden(input_embed, paged_kv_cache)), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        hidden = self._hidden(input_embeds, paged_kv_cache)
        hidden = op.take(hidden, logit_positions, axis=1)  # [1, batch, d]
        return self._logits(hidden), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._hidden(input_embeds, paged_kv_cache)), paged_kv_cache

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._hidden(input_embeds, paged_kv_cache)), paged_kv_cache

    # speculative decoding (EAGLE drafts read the target's final-norm hidden states; MLC names)
    def prefill_to_last_hidden_states(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._hidden(input_embed, paged_kv_cache), paged_kv_cache

    def decode_to_last_hidden_states(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        return self._hidden(input_embed, paged_kv_cache), paged_kv_cache

    def batch_verify_to_last_hidden_states(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._hidden(input_embeds, paged_kv_cache), paged_kv_cache

    def get_logits(self, hidden_states: Tensor) -> Tensor:
        return self._logits(hidden_states)

    def create_tir_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                                  prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                                  support_sliding_window: tirx.Var) -> PagedKVCache:
        return paged_kv_cache(self.cfg, self.dtype, self._target, max_batch_size, max_total_seq_len,
                              prefill_chunk_size, page_size, support_sliding_window)

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        d, dt = self.cfg.hidden_size, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        spec = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", d], dt), "paged_kv_cache": kv, "$": packed},
            "decode": {"input_embed": nn.spec.Tensor([1, 1, d], dt), "paged_kv_cache": kv, "$": packed},
            "batch_prefill": {"input_embeds": nn.spec.Tensor([1, "seq_len", d], dt),
                              "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                              "paged_kv_cache": kv, "$": packed},
            "batch_decode": {"input_embeds": nn.spec.Tensor(["batch_size", 1, d], dt), "paged_kv_cache": kv,
                             "$": packed},
            "batch_verify": {"input_embeds": nn.spec.Tensor([1, "seq_len", d], dt), "paged_kv_cache": kv,
                             "$": packed},
            "prefill_to_last_hidden_states": {"input_embed": nn.spec.Tensor([1, "seq_len", d], dt),
                                              "paged_kv_cache": kv, "$": packed},
            "decode_to_last_hidden_states": {"input_embed": nn.spec.Tensor([1, 1, d], dt), "paged_kv_cache": kv,
                                             "$": packed},
            "batch_verify_to_last_hidden_states": {"input_embeds": nn.spec.Tensor([1, "seq_len", d], dt),
                                                   "paged_kv_cache": kv, "$": packed},
            "get_logits": {"hidden_states": nn.spec.Tensor(["seq_len", d], dt), "$": packed},
            **({"decode_with_stats": {"input_embed": nn.spec.Tensor([1, 1, d], dt), "paged_kv_cache": kv,
                                      "$": packed},
                "batch_verify_with_stats": {"input_embeds": nn.spec.Tensor([1, "seq_len", d], dt),
                                            "paged_kv_cache": kv, "$": packed},
                "decode_to_last_hidden_states_with_stats": {"input_embed": nn.spec.Tensor([1, 1, d], dt),
                                                            "paged_kv_cache": kv, "$": packed},
                "batch_verify_to_last_hidden_states_with_stats": {
                    "input_embeds": nn.spec.Tensor([1, "seq_len", d], dt), "paged_kv_cache": kv, "$": packed},
                } if self.debug_counts else {}),
            "create_tir_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"}},
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def export_model(cfg: BlockFFNConfig, dtype: str, target, scheme: GroupQuant | None = None,
                 debug_counts: bool = False) -> tuple:
    """(IRModule, [(param name, nn.Parameter)]) for the given config, storage dtype, target and q4 scheme;
    ``debug_counts`` adds the ``*_with_stats`` functions (per-layer router counts)."""
    model = RelaxBlockFFN(cfg, dtype, scheme, debug_counts)
    model._target = target
    mod, named_params, ext_mods = model.export_tvm(spec=model.get_default_spec(), allow_extern=True)
    return mod, named_params, ext_mods
