"""q4 layers of the Relax model: group-quantized linear, embedding and expert weights (see `quantization`).

Each layer computes with a te function whose PrimFunc holds a ``dequantize`` block feeding its consumer (a matmul
``q4_matmul`` or a gather ``q4_take``), so the weight is dequantized inside the kernel that uses it: the GPU dlight
rules inline the block (MLC's fused dequantize-GEMV), and on CPU `blockffn.schedules.dense_q4_cpu` inlines it and
schedules the matmul; nothing materialises a full-precision weight at run time.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from blockffn.artifacts.q4 import BITS, GROUP_SIZE, MAX_INT, PER_WORD, GroupQuant
from blockffn.schedules.dense_q4_cpu import DEQUANTIZE_BLOCK, MATMUL_BLOCK  # the names its CPU rule recognises


def _decode(q_word, scale, elem, dtype: str):
    """(nibble ``elem`` of ``q_word`` − 7) · scale, in ``dtype``."""
    shift = (elem % PER_WORD).astype("uint32") * tirx.const(BITS, "uint32")
    code = tirx.bitwise_and(tirx.shift_right(q_word, shift), tirx.const(0xF, "uint32"))
    return (code.astype(dtype) - tirx.const(MAX_INT, dtype)) * scale.astype(dtype)


def linear_index(n, k):
    """Linear / embedding weight [N, K]: q_weight [N, K/8], q_scale [N, K/32]."""
    return (n, k // PER_WORD), (n, k // GROUP_SIZE), k


def up_index(De: int):
    """Logical up_proj [E·De, d] from q_weight [E, De, d/8]."""
    return lambda n, k: ((n // De, n % De, k // PER_WORD), (n // De, n % De, k // GROUP_SIZE), k)


def down_index(De: int):
    """Logical down_proj [d, E·De] (HF layout) from q_weight [E, d, De/8]."""
    return lambda n, k: ((k // De, n, (k % De) // PER_WORD), (k // De, n, (k % De) // GROUP_SIZE), k % De)


def dequantize_te(q_weight: te.Tensor, q_scale: te.Tensor, N, K, index, dtype: str) -> te.Tensor:
    def value(n, k):
        qi, si, elem = index(n, k)
        return _decode(q_weight[qi], q_scale[si], elem, dtype)

    return te.compute((N, K), value, name=DEQUANTIZE_BLOCK)


def q4_matmul(x: Tensor, q_weight: Tensor, q_scale: Tensor, N: int, K: int, index=linear_index,
              name: str = "q4_matmul") -> Tensor:
    """``x [..., K] · Wᵀ`` with W [N, K] dequantized inside the kernel; products are accumulated in fp32 (the
    expert down-projection sums E·De terms, too many for an fp16 accumulator) and cast back to x's dtype."""

    def compute(x, qw, qs):
        w = dequantize_te(qw, qs, N, K, index, x.dtype)
        k = te.reduce_axis((0, K), name="k")
        lead = len(x.shape) - 1
        acc = te.compute((*x.shape[:-1], N), lambda *i: te.sum(
            x[(*i[:lead], k)].astype("float32") * w[i[lead], k].astype("float32"), axis=k), name=MATMUL_BLOCK)
        if x.dtype == "float32":
            return acc
        return te.compute(acc.shape, lambda *i: acc[i].astype(x.dtype), name="q4_matmul_cast")

    return op.tensor_expr_op(compute, name, [x, q_weight, q_scale])


class QLinear(nn.Module):
    """nn.Linear (no bias) with MLC q4 weights: ``q_weight [out, in/8]`` uint32, ``q_scale [out, in/32]``."""

    def __init__(self, in_features: int, out_features: int, scheme: GroupQuant):
        self.in_features, self.out_features = in_features, out_features
        self.q_weight = nn.Parameter((out_features, in_features // PER_WORD), "uint32")
        self.q_scale = nn.Parameter((out_features, in_features // GROUP_SIZE), scheme.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return q4_matmul(x, self.q_weight, self.q_scale, self.out_features, self.in_features)


class QEmbedding(nn.Module):
    """nn.Embedding with q4 rows; ``lm_logits`` reuses it as a tied LM head."""

    def __init__(self, vocab: int, dim: int, scheme: GroupQuant):
        self.vocab, self.dim, self.dtype = vocab, dim, scheme.dtype
        self.q_weight = nn.Parameter((vocab, dim // PER_WORD), "uint32")
        self.q_scale = nn.Parameter((vocab, dim // GROUP_SIZE), scheme.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        dim, dtype = self.dim, self.dtype

        def compute(ids, qw, qs):
            return te.compute((*ids.shape, dim), lambda *i: _decode(
                qw[ids[i[:-1]], i[-1] // PER_WORD], qs[ids[i[:-1]], i[-1] // GROUP_SIZE], i[-1], dtype),
                name="q4_take")

        return op.tensor_expr_op(compute, "q4_take", [ids, self.q_weight, self.q_scale])

    def lm_logits(self, hidden: Tensor) -> Tensor:
        return q4_matmul(hidden, self.q_weight, self.q_scale, self.vocab, self.dim)


class QExperts(nn.Module):
    """One expert projection, expert-major q4: ``q_weight [E, out, in/8]``, ``q_scale [E, out, in/32]``."""

    def __init__(self, E: int, out_features: int, in_features: int, scheme: GroupQuant):
        self.q_weight = nn.Parameter((E, out_features, in_features // PER_WORD), "uint32")
        self.q_scale = nn.Parameter((E, out_features, in_features // GROUP_SIZE), scheme.dtype)
