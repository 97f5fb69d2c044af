"""Count-bounded sparse BlockFFN kernels for CPU targets (hand-scheduled TIR, marked ``tirx.is_scheduled``).

The three kernels of the chunk-sparse lowering.  The call's tokens form ``NC`` chunks of ``C`` consecutive tokens
(``chunk=None``: one chunk, the whole call — decode and speculative verification; a chunk of 8–32 tokens for
prefill, where the union of a whole long prompt would cover nearly every expert):

* ``union``  - per chunk c, ``idx[c, 0:count[c]]`` = ascending ids of the experts active (router logit > 0) for
  *any* token of the chunk; entries past ``count[c]`` are 0.  Tiny and serial: E×T comparisons.
* ``up``     - for every slot j < count[c] and token t of chunk c:
  ``h[t, j, :] = SiLU(up[idx[c, j]] · x[t]) * gate[t, idx[c, j]]``.  Parallel over (row group, slot); register
  tiles of tokens × expert rows, the dot product accumulated in ``VL``-lane vectors, then reduced.
* ``down``   - ``y[t, :] = Σ_{j<count[c]} Σ_k h[t, j, k] · down_t[idx[c, j]·De + k, :]``; parallel over output
  blocks, vectorised along the contiguous output dimension, token partial sums in registers.

Weights are expert-major slabs: ``up [E·De, d]`` (HF layout) and ``down_t [E·De, d]`` (HF ``down_proj``
transposed at compile time).  Slots past ``count`` exit immediately, so no device→host synchronisation and no
data-dependent shapes are needed (static memory planning and CUDA graphs stay valid).  Accumulation is fp32.
"""

from __future__ import annotations

from tvm.script import tirx as T

from blockffn.schedules.chunking import Chunking


def _vector_len(n: int, prefer: int) -> int:
    for v in (prefer, 32, 16, 8, 4, 2, 1):
        if v <= prefer and n % v == 0:
            return v
    return 1


def union_kernel(E: int, dtype: str, chunk: int | None = None):
    zero = T.Cast(dtype, 0)
    ch = Chunking(chunk)

    @T.prim_func(s_tir=True)
    def blockffn_union(a0_h: T.handle, idx_h: T.handle, cnt_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        a0 = T.match_buffer(a0_h, (n_tok, E), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        with T.sblock("root"):
            c = T.sblock_alloc_buffer((1,), "int32", scope="local")
            flag = T.sblock_alloc_buffer((1,), "int32", scope="local")
            for b in range(ch.count(n_tok)):
                c[0] = 0
                for e in range(E):
                    flag[0] = 0
                    for t in range(ch.tokens(b, n_tok)):
                        if a0[ch.start(b) + t, e] > zero:
                            flag[0] = 1
                    idx[b, e] = 0
                    if flag[0] == 1:
                        idx[b, c[0]] = e
                        c[0] = c[0] + 1
                cnt[b] = c[0]

    return blockffn_union


def up_kernel_cpu(E: int, De: int, d: int, dtype: str, TB: int = 4, groups: int = 4, chunk: int | None = None):
    """Parallel over (row group, slot) with the row group outermost: every thread's contiguous share of the
    iterations covers all slots, so the work of the ``count`` active slots splits evenly over up to ``groups``
    threads (a plain parallel loop over slots hands the low slots, the only active ones, to one thread), while each
    iteration still streams De/groups contiguous rows of one expert.  Rows go ``RB`` at a time: with ``TB`` or more
    tokens in the chunk a TB x RB register tile (each x vector serves RB rows, each weight vector TB tokens; rows
    past the chunk's last token read a clamped, valid token and are not stored); fewer tokens (decode) take a
    one-token loop with no padded work."""
    VL = _vector_len(d, 16)
    RB = _vector_len(De, TB)  # expert rows at once: independent FMA chains sharing one x load
    G = _vector_len(De // RB, groups)
    GB = De // RB // G  # row blocks per group
    ch = Chunking(chunk)

    @T.prim_func(s_tir=True)
    def blockffn_sparse_up(x_h: T.handle, gate_h: T.handle, up_h: T.handle, idx_h: T.handle, cnt_h: T.handle,
                           h_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        x = T.match_buffer(x_h, (n_tok, d), dtype)
        gate = T.match_buffer(gate_h, (n_tok, E), dtype)
        up = T.match_buffer(up_h, (E * De, d), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        for p in T.parallel(G * E):
            with T.sblock("slot_rows"):
                acc = T.sblock_alloc_buffer((TB * RB, VL), "float32", scope="local")
                acc1 = T.sblock_alloc_buffer((RB, VL), "float32", scope="local")  # one-token tile
                s = T.sblock_alloc_buffer((1,), "float32", scope="local")
                for b in range(ch.count(n_tok)):
                    if p % E < cnt[b]:
                        for kb in range(GB):
                            if ch.tokens(b, n_tok) < TB:  # one token at a time, no padded work
                                for t in range(ch.tokens(b, n_tok)):
                                    for r in T.unroll(RB):
                                        for v in T.vectorized(VL):
                                            acc1[r, v] = T.float32(0)
                                    for dd in range(d // VL):
                                        for r in T.unroll(RB):
                                            for v in T.vectorized(VL):
                                                acc1[r, v] = acc1[r, v] + T.Cast(
                                                    "float32", x[ch.start(b) + t, dd * VL + v]) * T.Cast(
                                                    "float32", up[idx[b, p % E] * De + (p // E * GB + kb) * RB + r,
                                                                  dd * VL + v])
                                    for r in range(RB):
                                        s[0] = T.float32(0)
                                        for v in range(VL):
                                            s[0] = s[0] + acc1[r, v]
                                        h[ch.start(b) + t, p % E, (p // E * GB + kb) * RB + r] = s[0] / (
                                            T.float32(1) + T.exp(T.float32(0) - s[0])) * T.Cast(
                                            "float32", gate[ch.start(b) + t, idx[b, p % E]])
                            else:
                                for t0 in range((ch.tokens(b, n_tok) + TB - 1) // TB):
                                    for tt in T.unroll(TB):
                                        for r in T.unroll(RB):
                                            for v in T.vectorized(VL):
                                                acc[tt * RB + r, v] = T.float32(0)
                                    for dd in range(d // VL):
                                        for tt in T.unroll(TB):
                                            for r in T.unroll(RB):
                                                for v in T.vectorized(VL):
                                                    acc[tt * RB + r, v] = acc[tt * RB + r, v] + T.Cast(
                                                        "float32", x[ch.start(b) + T.min(t0 * TB + tt,
                                                                                         ch.tokens(b, n_tok) - 1),
                                                                     dd * VL + v]) * T.Cast(
                                                        "float32", up[idx[b, p % E] * De + (p // E * GB + kb) * RB + r,
                                                                      dd * VL + v])
                                    for tt in range(TB):
                                        if t0 * TB + tt < ch.tokens(b, n_tok):
                                            for r in range(RB):
                                                s[0] = T.float32(0)
                                                for v in range(VL):
                                                    s[0] = s[0] + acc[tt * RB + r, v]
                                                h[ch.start(b) + t0 * TB + tt, p % E, (p // E * GB + kb) * RB + r] = (
                                                    s[0] / (T.float32(1) + T.exp(T.float32(0) - s[0])) * T.Cast(
                                                        "float32", gate[ch.start(b) + t0 * TB + tt, idx[b, p % E]]))

    return blockffn_sparse_up


def down_kernel_cpu(E: int, De: int, d: int, dtype: str, TB: int = 4, chunk: int | None = None):
    """Parallel over ``OB``-wide output blocks.  With ``TB`` or more tokens in a chunk the block's partial sums for
    TB tokens live in registers while the chunk's active experts' rows stream by (each weight vector serves TB
    tokens; rows past the chunk's last token use a clamped, valid token and are not stored); fewer tokens
    accumulate straight into ``y``."""
    OB = _vector_len(d, 64)
    ch = Chunking(chunk)

    @T.prim_func(s_tir=True)
    def blockffn_sparse_down(h_h: T.handle, down_h: T.handle, idx_h: T.handle, cnt_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        down = T.match_buffer(down_h, (E * De, d), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        y = T.match_buffer(y_h, (n_tok, d), "float32")
        for ob in T.parallel(d // OB):
            with T.sblock("out_block"):
                acc = T.sblock_alloc_buffer((TB, OB), "float32", scope="local")
                for b in range(ch.count(n_tok)):
                    if ch.tokens(b, n_tok) < TB:
                        for t in range(ch.tokens(b, n_tok)):
                            for o in T.vectorized(OB):
                                y[ch.start(b) + t, ob * OB + o] = T.float32(0)
                        for j in range(E):
                            if j < cnt[b]:
                                for k in range(De):
                                    for t in range(ch.tokens(b, n_tok)):
                                        for o in T.vectorized(OB):
                                            y[ch.start(b) + t, ob * OB + o] = y[ch.start(b) + t, ob * OB + o] + h[
                                                ch.start(b) + t, j, k] * T.Cast(
                                                "float32", down[idx[b, j] * De + k, ob * OB + o])
                    else:
                        for t0 in range((ch.tokens(b, n_tok) + TB - 1) // TB):
                            for tt in T.unroll(TB):
                                for o in T.vectorized(OB):
                                    acc[tt, o] = T.float32(0)
                            for j in range(E):
                                if j < cnt[b]:
                                    for k in range(De):
                                        for tt in T.unroll(TB):
                                            for o in T.vectorized(OB):
                                                acc[tt, o] = acc[tt, o] + h[ch.start(b) + T.min(
                                                    t0 * TB + tt, ch.tokens(b, n_tok) - 1), j, k] * T.Cast(
                                                    "float32", down[idx[b, j] * De + k, ob * OB + o])
                            for tt in range(TB):
                                if t0 * TB + tt < ch.tokens(b, n_tok):
                                    for o in T.vectorized(OB):
                                        y[ch.start(b) + t0 * TB + tt, ob * OB + o] = acc[tt, o]

    return blockffn_sparse_down
