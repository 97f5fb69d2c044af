"""What a decode step must read, and how fast this machine reads: the two halves of a bandwidth fraction.

``step_weight_bytes`` counts the weights one single-token decode step reads: every layer's attention projections,
router and norms, the active fraction of its experts, the LM head, and *one* embedding row (not the table); the KV
cache is excluded.  ``cpu_bandwidth`` measures copy bandwidth with as many threads as decode uses, because one
thread cannot saturate a memory controller that all of them share.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from blockffn.artifacts.q4 import GROUP_SIZE


def weight_bytes_per_element(quantization: str) -> float:
    """Bytes per weight as stored: q4 = 4 bits plus one scale (2 or 4 bytes) per group of 32."""
    if quantization.startswith("q4"):
        return 0.5 + (2 if "f16" in quantization else 4) / GROUP_SIZE
    return 4.0 if quantization.endswith("f32") else 2.0


def step_weight_bytes(cfg, fraction: float, quantization: str) -> float:
    """Weight bytes of one decode step with ``fraction`` of the experts active (1.0: dense)."""
    d, L, V, E, De = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.num_experts, cfg.expert_size
    if cfg.attention_type == "mla":
        h, nope, rope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        attn = (d * cfg.q_lora_rank + cfg.q_lora_rank * h * (nope + rope) + d * (cfg.kv_lora_rank + rope)
                + cfg.kv_lora_rank * h * (nope + v) + h * v * d)
    else:
        hd = cfg.gqa_head_dim
        attn = d * cfg.num_attention_heads * hd * 2 + 2 * d * cfg.num_key_value_heads * hd
    wb = weight_bytes_per_element(quantization)
    full = 4.0 if quantization.endswith("f32") or quantization.endswith("f32_1") else 2.0  # router, norms
    per_layer = wb * (attn + fraction * 2 * E * De * d) + full * (E * d + 2 * d + E)
    return L * per_layer + wb * V * d + wb * d + full * d  # layers, LM head, one embedding row, final norm


def cpu_bandwidth(threads: int, nbytes: int = 1 << 28, repeat: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second, best of ``repeat``) with ``threads`` threads, each
    copying its own slice (numpy releases the GIL while copying)."""
    n = nbytes // 4
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as pool:
        def copy():
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))

        copy()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            copy()
            best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best
