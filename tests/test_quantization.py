"""q4 group quantization: the scheme against an element-by-element numpy reference, the compiled dequantize
kernel bit for bit, and which tensors are quantized."""

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import te

from blockffn.compiler.quantization import (SCHEMES, dequantize, fake_quantize_model, is_quantized,
                                            library_tensors, quantize)
from blockffn.compiler.relax_quant import dequantize_te, linear_index
from blockffn.errors import BlockFFNError
from blockffn.model import BlockFFNForCausalLM
from tests.conftest import small_config


def reference_round_trip(w: np.ndarray, scale_dtype: str):
    """The scheme written out one group and one element at a time (mlc.md §1.2)."""
    rows, K = w.shape
    packed = np.zeros((rows, K // 8), np.uint32)
    scales = np.zeros((rows, K // 32), scale_dtype)
    out = np.zeros((rows, K), scale_dtype)
    for r in range(rows):
        for g in range(K // 32):
            group = w[r, g * 32:(g + 1) * 32].astype(np.float32)
            s = np.array(np.abs(group).max() / np.float32(7), np.float32).astype(scale_dtype)
            scales[r, g] = s
            for j in range(32):
                x = group[j] / np.float32(s) + np.float32(7) if s != 0 else np.float32(7)
                q = int(min(max(np.rint(x), 0), 14))
                k = g * 32 + j
                packed[r, k // 8] |= np.uint32(q << (4 * (k % 8)))
                out[r, k] = (np.array(q, scale_dtype) - np.array(7, scale_dtype)) * s
    return packed, scales, out


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(SCHEMES)), st.integers(1, 4), st.integers(1, 3), st.floats(1e-3, 30.0),
       st.integers(0, 2**16))
def test_round_trip_equals_reference_bit_for_bit(name, rows, groups, magnitude, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, groups * 32)) * magnitude).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero group: scale 0, every code 7
    scheme = SCHEMES[name]
    q, s = quantize(w, scheme)
    ref_q, ref_s, ref_w = reference_round_trip(w, scheme.dtype)
    assert q.dtype == np.uint32 and s.dtype == np.dtype(scheme.dtype)
    assert np.array_equal(q, ref_q)
    assert np.array_equal(s.view(np.uint8), ref_s.view(np.uint8))
    assert np.array_equal(dequantize(q, s).view(np.uint8), ref_w.view(np.uint8))
    assert np.abs(dequantize(q, s).astype(np.float32) - w).max() <= np.abs(w).max() / 14 * 1.01 + 1e-6


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_compiled_dequantize_equals_numpy_bit_for_bit(name):
    scheme = SCHEMES[name]
    N, K = 48, 128
    w = np.random.default_rng(3).standard_normal((N, K)).astype(np.float32)
    q, s = quantize(w, scheme)
    qw = te.placeholder((N, K // 8), "uint32", name="q_weight")
    qs = te.placeholder((N, K // 32), scheme.dtype, name="q_scale")
    out = dequantize_te(qw, qs, N, K, linear_index, scheme.dtype)
    f = tvm.compile(te.create_prim_func([qw, qs, out]), target="llvm")
    got = tvm.runtime.empty((N, K), scheme.dtype)
    f(tvm.runtime.tensor(q), tvm.runtime.tensor(s), got)
    assert np.array_equal(got.numpy().view(np.uint8), dequantize(q, s).view(np.uint8))


def test_router_and_norms_stay_full_precision():
    cfg = small_config()
    model = BlockFFNForCausalLM(cfg).init_weights(seed=0)
    quantized = {n for n in model.state_dict() if is_quantized(n)}
    assert not any("router" in n or "norm" in n for n in quantized)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj",
            "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_a_proj.weight",
            "model.layers.1.self_attn.o_proj.weight"} <= quantized
    tensors = library_tensors(model.state_dict(), cfg, SCHEMES["q4f16_1"])
    E, De, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    assert tensors["model.layers.0.mlp.up_proj.q_weight"].shape == (E, De, d // 8)
    assert tensors["model.layers.0.mlp.down_proj.q_weight"].shape == (E, d, De // 8)
    assert tensors["model.layers.0.mlp.down_proj.q_scale"].shape == (E, d, De // 32)
    router = tensors["model.layers.0.mlp.router_proj.weight"]
    assert router.dtype == np.float16 and router.shape == (E, d)


def test_expert_slabs_hold_one_expert_each():
    """Expert e's q4 slab dequantizes to exactly its rows of up_proj / columns of down_proj (fake quantized)."""
    cfg = small_config()
    model = BlockFFNForCausalLM(cfg).init_weights(seed=0)
    scheme = SCHEMES["q4f32_1"]
    tensors = library_tensors(model.state_dict(), cfg, scheme)
    fake = fake_quantize_model(model, scheme).state_dict()
    E, De = cfg.num_experts, cfg.expert_size
    for e in (0, E - 1):
        up = dequantize(tensors["model.layers.1.mlp.up_proj.q_weight"][e],
                        tensors["model.layers.1.mlp.up_proj.q_scale"][e])
        assert torch.equal(torch.from_numpy(up), fake["model.layers.1.mlp.up_proj"][e * De:(e + 1) * De])
        down = dequantize(tensors["model.layers.1.mlp.down_proj.q_weight"][e],
                          tensors["model.layers.1.mlp.down_proj.q_scale"][e])
        assert torch.equal(torch.from_numpy(down), fake["model.layers.1.mlp.down_proj"][:, e * De:(e + 1) * De])


def test_group_size_mismatch_is_one_actionable_line():
    with pytest.raises(BlockFFNError, match="multiple of the quantization group size 32.*q0f16"):
        quantize(np.ones((2, 40), np.float32), SCHEMES["q4f16_1"])
    with pytest.raises(BlockFFNError, match="q4f32_1"):
        quantize(np.full((1, 32), 1e6, np.float32), SCHEMES["q4f16_1"])
