"""Count-bounded sparse BlockFFN kernels for CPU targets (hand-scheduled TIR, marked ``tirx.is_scheduled``).

The three kernels of the chunk-sparse lowering:

* ``union``  - ``idx[0:count]`` = ascending ids of the experts active (router logit > 0) for *any* token of the
  call; entries past ``count`` are 0.  Tiny and serial: E×T comparisons.
* ``up``     - for every expert slot j < count and token t: ``h[t, j, :] = SiLU(up[idx[j]] · x[t]) * gate[t, idx[j]]``.
  Parallel over slots; each weight row is read once and reused for all tokens while in L1; the dot product is
  accumulated in a thread-private ``VL``-lane vector (vectorised), then reduced.
* ``down``   - ``y[t, :] = Σ_{j<count} Σ_k h[t, j, k] · down_t[idx[j]·De + k, :]``; parallel over output blocks,
  vectorised along the contiguous output dimension.

Weights are expert-major slabs: ``up [E·De, d]`` (HF layout) and ``down_t [E·De, d]`` (HF ``down_proj``
transposed at compile time).  Slots past ``count`` exit immediately, so no device→host synchronisation and no
data-dependent shapes are needed (static memory planning and CUDA graphs stay valid).  Accumulation is fp32.
"""

from __future__ import annotations

from tvm.script import tirx as T


def _vector_len(n: int, prefer: int) -> int:
    for v in (prefer, 32, 16, 8, 4, 2, 1):
        if v <= prefer and n % v == 0:
            return v
    return 1


def union_kernel(E: int, dtype: str):
    zero = T.Cast(dtype, 0)

    @T.prim_func(s_tir=True)
    def blockffn_union(a0_h: T.handle, idx_h: T.handle, cnt_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        a0 = T.match_buffer(a0_h, (n_tok, E), dtype)
        idx = T.match_buffer(idx_h, (E,), "int32")
        cnt = T.match_buffer(cnt_h, (1,), "int32")
        with T.sblock("root"):
            c = T.sblock_alloc_buffer((1,), "int32", scope="local")
            flag = T.sblock_alloc_buffer((1,), "int32", scope="local")
            c[0] = 0
            for e in range(E):
                flag[0] = 0
                for t in range(n_tok):
                    if a0[t, e] > zero:
                        flag[0] = 1
                idx[e] = 0
                if flag[0] == 1:
                    idx[c[0]] = e
                    c[0] = c[0] + 1
            cnt[0] = c[0]

    return blockffn_union


def up_kernel_cpu(E: int, De: int, d: int, dtype: str, TB: int = 4, groups: int = 4):
    """Parallel over (row group, slot) with the row group outermost: every thread's contiguous share of the
    iterations covers all slots, so the work of the ``count`` active slots splits evenly over up to ``groups``
    threads (a plain parallel loop over slots hands the low slots, the only active ones, to one thread), while each
    iteration still streams De/groups contiguous rows of one expert.  Rows go ``RB`` at a time: with ``TB`` or more
    tokens a TB x RB register tile (each x vector serves RB rows, each weight vector TB tokens; rows past the last
    token read a clamped, valid token and are not stored); fewer tokens (decode) take a one-token loop with no
    padded work."""
    VL = _vector_len(d, 16)
    RB = _vector_len(De, TB)  # expert rows at once: independent FMA chains sharing one x load
    G = _vector_len(De // RB, groups)
    GB = De // RB // G  # row blocks per group

    @T.prim_func(s_tir=True)
    def blockffn_sparse_up(x_h: T.handle, gate_h: T.handle, up_h: T.handle, idx_h: T.handle, cnt_h: T.handle,
                           h_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        x = T.match_buffer(x_h, (n_tok, d), dtype)
        gate = T.match_buffer(gate_h, (n_tok, E), dtype)
        up = T.match_buffer(up_h, (E * De, d), dtype)
        idx = T.match_buffer(idx_h, (E,), "int32")
        cnt = T.match_buffer(cnt_h, (1,), "int32")
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        for p in T.parallel(G * E):
            with T.sblock("slot_rows"):
                acc = T.sblock_alloc_buffer((TB * RB, VL), "float32", scope="local")
                acc1 = T.sblock_alloc_buffer((RB, VL), "float32", scope="local")  # decode tile
                s = T.sblock_alloc_buffer((1,), "float32", scope="local")
                if p % E < cnt[0]:
                    for kb in range(GB):
                        if n_tok < TB:  # decode: one token at a time, no padded work
                            for t in range(n_tok):
                                for r in T.unroll(RB):
                                    for v in T.vectorized(VL):
                                        acc1[r, v] = T.float32(0)
                                for dd in range(d // VL):
                                    for r in T.unroll(RB):
                                        for v in T.vectorized(VL):
                                            acc1[r, v] = acc1[r, v] + T.Cast("float32", x[t, dd * VL + v]) * T.Cast(
                                                "float32", up[idx[p % E] * De + (p // E * GB + kb) * RB + r, dd * VL + v])
                                for r in range(RB):
                                    s[0] = T.float32(0)
                                    for v in range(VL):
                                        s[0] = s[0] + acc1[r, v]
                                    h[t, p % E, (p // E * GB + kb) * RB + r] = s[0] / (
                                        T.float32(1) + T.exp(T.float32(0) - s[0])) * T.Cast("float32", gate[t, idx[p % E]])
                        else:
                            for t0 in range((n_tok + TB - 1) // TB):
                                for tt in T.unroll(TB):
                                    for r in T.unroll(RB):
                                        for v in T.vectorized(VL):
                                            acc[tt * RB + r, v] = T.float32(0)
                                for dd in range(d // VL):
                                    for tt in T.unroll(TB):
                                        for r in T.unroll(RB):
                                            for v in T.vectorized(VL):
                                                acc[tt * RB + r, v] = acc[tt * RB + r, v] + T.Cast(
                                                    "float32", x[T.min(t0 * TB + tt, n_tok - 1), dd * VL + v]) * T.Cast(
                                                    "float32", up[idx[p % E] * De + (p // E * GB + kb) * RB + r, dd * VL + v])
                                for tt in range(TB):
                                    if t0 * TB + tt < n_tok:
                                        for r in range(RB):
                                            s[0] = T.float32(0)
                                            for v in range(VL):
                                                s[0] = s[0] + acc[tt * RB + r, v]
                                            h[t0 * TB + tt, p % E, (p // E * GB + kb) * RB + r] = s[0] / (
                                                T.float32(1) + T.exp(T.float32(0) - s[0])) * T.Cast(
                                                "float32", gate[t0 * TB + tt, idx[p % E]])

    return blockffn_sparse_up


def down_kernel_cpu(E: int, De: int, d: int, dtype: str, TB: int = 4):
    """Parallel over ``OB``-wide output blocks.  With ``TB`` or more tokens the block's partial sums for TB tokens
    live in registers while the active experts' rows stream by (each weight vector serves TB tokens; rows past the
    last token use a clamped, valid token and are not stored); fewer tokens accumulate straight into ``y``."""
    OB = _vector_len(d, 64)

    @T.prim_func(s_tir=True)
    def blockffn_sparse_down(h_h: T.handle, down_h: T.handle, idx_h: T.handle, cnt_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        down = T.match_buffer(down_h, (E * De, d), dtype)
        idx = T.match_buffer(idx_h, (E,), "int32")
        cnt = T.match_buffer(cnt_h, (1,), "int32")
        y = T.match_buffer(y_h, (n_tok, d), "float32")
        for ob in T.parallel(d // OB):
            with T.sblock("out_block"):
                acc = T.sblock_alloc_buffer((TB, OB), "float32", scope="local")
                if n_tok < TB:
                    for t in range(n_tok):
                        for o in T.vectorized(OB):
                            y[t, ob * OB + o] = T.float32(0)
                    for j in range(E):
                        if j < cnt[0]:
                            for k in range(De):
                                for t in range(n_tok):
                                    for o in T.vectorized(OB):
                                        y[t, ob * OB + o] = y[t, ob * OB + o] + h[t, j, k] * T.Cast(
                                            "float32", down[idx[j] * De + k, ob * OB + o])
                else:
                    for t0 in range((n_tok + TB - 1) // TB):
                        for tt in T.unroll(TB):
                            for o in T.vectorized(OB):
                                acc[tt, o] = T.float32(0)
                        for j in range(E):
                            if j < cnt[0]:
                                for k in range(De):
                                    for tt in T.unroll(TB):
                                        for o in T.vectorized(OB):
                                            acc[tt, o] = acc[tt, o] + h[T.min(t0 * TB + tt, n_tok - 1), j, k] * T.Cast(
                                                "float32", down[idx[j] * De + k, ob * OB + o])
                        for tt in range(TB):
                            if t0 * TB + tt < n_tok:
                                for o in T.vectorized(OB):
                                    y[t0 * TB + tt, ob * OB + o] = acc[tt, o]

    return blockffn_sparse_down
