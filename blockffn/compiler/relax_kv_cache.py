"""The paged KV cache of the Relax model: what each layer stores (MLA runs as MHA over [rope | nope] heads) and the
TIR cache object, with the 0.27 wheel's CPU tree-attention argument order fixed."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from blockffn.model.config import BlockFFNConfig


def cache_layout(cfg: BlockFFNConfig) -> dict:
    """What the paged KV cache holds per layer: MLA runs as MHA over [rope | nope] heads (v padded to that size)."""
    if cfg.attention_type == "mla":
        return {"num_key_value_heads": cfg.num_attention_heads, "head_dim": cfg.mla_q_head_dim,
                "rotary_dim": cfg.qk_rope_head_dim}
    return {"num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.gqa_head_dim,
            "rotary_dim": cfg.gqa_head_dim}


def paged_kv_cache(c: BlockFFNConfig, dtype: str, target, max_batch_size, max_total_seq_len, prefill_chunk_size,
                   page_size, support_sliding_window) -> PagedKVCache:
    """The TIR paged KV cache for ``c``'s attention layers (MLA stored as MHA, see `cache_layout`)."""
    kv = cache_layout(c)
    return _TIRPagedKVCache(
        attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
        prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=support_sliding_window,
        layer_partition=relax.ShapeExpr([0, c.num_hidden_layers]), num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=kv["num_key_value_heads"],
        qk_head_dim=kv["head_dim"], v_head_dim=kv["head_dim"], mla_original_qk_head_dim=0,
        mla_original_v_head_dim=0, rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=c.rope_theta,
        rope_scaling={}, rope_ext_factors=relax.prim_value(0), rotary_dim=kv["rotary_dim"],
        enable_disaggregation=False, dtype=dtype, target=target)


def _fix_cpu_tree_attention_order(call: relax.Call) -> relax.Call:
    """The 0.27 wheel's TIRPagedKVCache passes the two CPU tree-attention kernels in the wrong order (ragged
    first, paged second; the runtime and the GPU branch expect paged first), so `batch_verify` on llvm fails
    with an argument-count error.  Swap them back."""
    args = list(call.args)
    slots = [i for i, a in enumerate(args) if isinstance(a, relax.Tuple) and len(a.fields) == 2
             and isinstance(a.fields[1], tvm.ir.GlobalVar)
             and ("tree_mask" in a.fields[1].name_hint or "tree_attn" in a.fields[1].name_hint)]
    if len(slots) == 2:
        first, second = slots
        if "paged" not in args[first].fields[1].name_hint and "paged" in args[second].fields[1].name_hint:
            args[first], args[second] = args[second], args[first]
    return relax.Call(call.op, args, call.attrs, call.ty_args)


class _TreeAttentionOrderFix(PagedKVCache):
    def __init__(self, _expr, _name):
        super().__init__(_expr=_fix_cpu_tree_attention_order(_expr), _name=_name)


class _TIRPagedKVCache(TIRPagedKVCache, _TreeAttentionOrderFix):
    """TIRPagedKVCache whose creation call goes through `_fix_cpu_tree_attention_order` (MRO puts the fix
    between TIRPagedKVCache and PagedKVCache, where the call expression is handed over)."""
