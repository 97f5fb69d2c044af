"""Count-bounded sparse BlockFFN kernels over q4 expert weights (q4f16_1 / q4f32_1), CPU and GPU families.

Same contract as ``sparse_cpu`` (per token chunk: union → gathered up → gathered down, slots past ``count``
skipped), but the
expert weights are MLC's expert-major q4 slabs, dequantized inside the inner loop (never stored in full
precision): ``up_q [E, De, d/8]`` / ``up_s [E, De, d/32]`` and ``down_q [E, d, De/8]`` / ``down_s [E, d, De/32]``,
value ``(nibble − 7)·scale``, nibble ``j`` of a word at bits ``4·(j % 8)``.  Products are accumulated in fp32
(the dequantized value ``(q − 7)·scale`` is exact in fp32 for fp16 scales).

CPU: one uint32 word decodes into an 8-lane vector (a per-lane shift), so the up kernel dequantizes one expert
row into a thread-local fp32 row and reuses it for every token of the call; the down kernel decodes one
``De``-long row per (output feature, active expert) and dots it with each token's hidden slice.
GPU: up — a warp per expert row, each lane loading 16 bytes (one scale group) per step, warp-summed; down —
split-K partial sums over the active slots (a thread per output feature decoding its expert row with 16-byte
loads), added and cast by ``sparse_gpu.reduce_kernel_gpu``.
"""

from __future__ import annotations

from tvm.script import tirx as T

from blockffn.artifacts.q4 import BITS, GROUP_SIZE, MAX_INT, PER_WORD
from blockffn.schedules.chunking import Chunking
from blockffn.schedules.sparse_gpu import warp_sum

WPG = GROUP_SIZE // PER_WORD  # uint32 words per scale group


def _decode(word, lane, scale):
    """fp32 value of nibble ``lane`` of ``word`` (both TIR expressions)."""
    code = T.bitwise_and(T.shift_right(word, T.Cast("uint32", lane * BITS)), T.uint32(0xF))
    return (T.Cast("float32", code) - T.float32(MAX_INT)) * T.Cast("float32", scale)


def _silu_gate(s, g):
    return s / (T.float32(1) + T.exp(T.float32(0) - s)) * T.Cast("float32", g)


def up_kernel_cpu(E: int, De: int, d: int, dtype: str, groups: int = 4, chunk: int | None = None):
    """Parallel over (row group, slot), row group outermost, so the active slots' work splits evenly over threads
    (see ``sparse_cpu.up_kernel_cpu``); each expert row is decoded once per chunk and serves its tokens."""
    ch = Chunking(chunk)
    VL = PER_WORD
    G = next(g for g in range(min(groups, De), 0, -1) if De % g == 0)
    GR = De // G  # rows per group

    @T.prim_func(s_tir=True)
    def blockffn_sparse_up_q4(x_h: T.handle, gate_h: T.handle, q_h: T.handle, s_h: T.handle, idx_h: T.handle,
                              cnt_h: T.handle, h_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        x = T.match_buffer(x_h, (n_tok, d), dtype)
        gate = T.match_buffer(gate_h, (n_tok, E), dtype)
        q = T.match_buffer(q_h, (E, De, d // PER_WORD), "uint32")
        sc = T.match_buffer(s_h, (E, De, d // GROUP_SIZE), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        for p in T.parallel(G * E):
            with T.sblock("slot"):
                row = T.sblock_alloc_buffer((d,), "float32", scope="local")
                acc = T.sblock_alloc_buffer((VL,), "float32", scope="local")
                s = T.sblock_alloc_buffer((1,), "float32", scope="local")
                for b in range(ch.count(n_tok)):
                    if p % E < cnt[b]:
                        for kk in range(GR):
                            for w in range(d // PER_WORD):
                                for v in T.vectorized(VL):
                                    row[w * VL + v] = _decode(q[idx[b, p % E], p // E * GR + kk, w], v,
                                                              sc[idx[b, p % E], p // E * GR + kk, w // WPG])
                            for t in range(ch.tokens(b, n_tok)):
                                for v in T.vectorized(VL):
                                    acc[v] = T.float32(0)
                                for w in range(d // VL):
                                    for v in T.vectorized(VL):
                                        acc[v] = acc[v] + T.Cast("float32", x[ch.start(b) + t, w * VL + v]) * row[
                                            w * VL + v]
                                s[0] = T.float32(0)
                                for v in range(VL):
                                    s[0] = s[0] + acc[v]
                                h[ch.start(b) + t, p % E, p // E * GR + kk] = _silu_gate(
                                    s[0], gate[ch.start(b) + t, idx[b, p % E]])

    return blockffn_sparse_up_q4


def down_kernel_cpu(E: int, De: int, d: int, dtype: str, chunk: int | None = None):
    ch = Chunking(chunk)
    VL = PER_WORD
    OB = next(v for v in (16, 8, 4, 2, 1) if d % v == 0)

    @T.prim_func(s_tir=True)
    def blockffn_sparse_down_q4(h_h: T.handle, q_h: T.handle, s_h: T.handle, idx_h: T.handle, cnt_h: T.handle,
                                y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        q = T.match_buffer(q_h, (E, d, De // PER_WORD), "uint32")
        sc = T.match_buffer(s_h, (E, d, De // GROUP_SIZE), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        y = T.match_buffer(y_h, (n_tok, d), "float32")
        for ob in T.parallel(d // OB):
            with T.sblock("out_block"):
                row = T.sblock_alloc_buffer((De,), "float32", scope="local")
                acc = T.sblock_alloc_buffer((VL,), "float32", scope="local")
                s = T.sblock_alloc_buffer((1,), "float32", scope="local")
                for t in range(n_tok):
                    for o in range(OB):
                        y[t, ob * OB + o] = T.float32(0)
                for b in range(ch.count(n_tok)):
                    for j in range(E):
                        if j < cnt[b]:
                            for o in range(OB):
                                for w in range(De // PER_WORD):
                                    for v in T.vectorized(VL):
                                        row[w * VL + v] = _decode(q[idx[b, j], ob * OB + o, w], v,
                                                                  sc[idx[b, j], ob * OB + o, w // WPG])
                                for t in range(ch.tokens(b, n_tok)):
                                    for v in T.vectorized(VL):
                                        acc[v] = T.float32(0)
                                    for w in range(De // VL):
                                        for v in T.vectorized(VL):
                                            acc[v] = acc[v] + h[ch.start(b) + t, j, w * VL + v] * row[w * VL + v]
                                    s[0] = T.float32(0)
                                    for v in range(VL):
                                        s[0] = s[0] + acc[v]
                                    y[ch.start(b) + t, ob * OB + o] = y[ch.start(b) + t, ob * OB + o] + s[0]

    return blockffn_sparse_down_q4


TOKEN_TILE = 4
WARP = 32


def _words_per_load(words: int) -> int:
    """uint32 words per lane load: 4 (16 bytes) when they tile the row across a warp, else narrower."""
    return next((v for v in (4, 2) if words % (WARP * v) == 0), 1)


def up_kernel_gpu(E: int, De: int, d: int, dtype: str, chunk: int | None = None, warps: int = 8,
                  token_tile: int = TOKEN_TILE):
    """Block (slot j, ``warps`` expert rows, chunk); a warp per row, each lane loading 4 words (32 weights, one
    scale group) per step; a 4-token tile of dot products summed across the warp by TVM's allreduce."""
    ch = Chunking(chunk)
    WORDS = d // PER_WORD
    LANES = WARP if WORDS % WARP == 0 else 1
    VW = _words_per_load(WORDS) if LANES == WARP else 1
    STEPS = WORDS // (LANES * VW)
    W = next(v for v in range(min(De, warps), 0, -1) if De % v == 0)
    TT = token_tile  # 1 for decode: no per-nibble test of absent tokens

    @T.prim_func(s_tir=True)
    def blockffn_sparse_up_q4_gpu(x_h: T.handle, gate_h: T.handle, q_h: T.handle, s_h: T.handle,
                                  idx_h: T.handle, cnt_h: T.handle, h_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        x = T.match_buffer(x_h, (n_tok, d), dtype)
        gate = T.match_buffer(gate_h, (n_tok, E), dtype)
        q = T.match_buffer(q_h, (E, De, WORDS), "uint32")
        sc = T.match_buffer(s_h, (E, De, d // GROUP_SIZE), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        for b in T.thread_binding(ch.count(n_tok), thread="blockIdx.z"):
            for j in T.thread_binding(E, thread="blockIdx.x"):
                for c in T.thread_binding(De // W, thread="blockIdx.y"):
                    for w in T.thread_binding(W, thread="threadIdx.y"):
                        for lane in T.thread_binding(LANES, thread="threadIdx.x"):
                            with T.sblock("up"):
                                wq = T.sblock_alloc_buffer((VW,), "uint32", scope="local")
                                val = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                acc = T.sblock_alloc_buffer((TT,), "float32", scope="local")
                                one = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                sum1 = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                tot = T.sblock_alloc_buffer((TT,), "float32", scope="local")
                                if j < cnt[b]:
                                    for tt in range((ch.tokens(b, n_tok) + TT - 1) // TT):
                                        for u in T.unroll(TT):
                                            acc[u] = T.float32(0)
                                        for i in T.unroll(STEPS):
                                            for v in T.vectorized(VW):
                                                wq[v] = q[idx[b, j], c * W + w, (i * LANES + lane) * VW + v]
                                            for v in T.unroll(VW):
                                                for k in T.unroll(PER_WORD):
                                                    val[0] = _decode(wq[v], k, sc[idx[b, j], c * W + w,
                                                                                  ((i * LANES + lane) * VW + v) // WPG])
                                                    for u in T.unroll(TT):
                                                        if tt * TT + u < ch.tokens(b, n_tok):
                                                            acc[u] = acc[u] + val[0] * T.Cast("float32", x[
                                                                ch.start(b) + tt * TT + u,
                                                                ((i * LANES + lane) * VW + v) * PER_WORD + k])
                                        for u in range(TT):
                                            if tt * TT + u < ch.tokens(b, n_tok):
                                                warp_sum(acc, u, one, sum1, tot, lane)
                                        if lane == 0:
                                            for u in range(TT):
                                                if tt * TT + u < ch.tokens(b, n_tok):
                                                    h[ch.start(b) + tt * TT + u, j, c * W + w] = _silu_gate(
                                                        tot[u], gate[ch.start(b) + tt * TT + u, idx[b, j]])

    return blockffn_sparse_up_q4_gpu


def down_splits_gpu(E: int, d: int, chunk: int | None, threads: int = 128, target_blocks: int = 512) -> int:
    """Slot splits of the q4 down-projection: enough blocks for a large GPU at a single token whatever the union
    size; prefill chunks already give parallelism."""
    if chunk is not None:
        return 4
    blocks = d // next(v for v in (threads, 64, 32, 16, 8, 4, 2, 1) if d % v == 0)
    return max(1, min(E, target_blocks // blocks))


def down_kernel_gpu(E: int, De: int, d: int, dtype: str, chunk: int | None = None, threads: int = 128,
                    token_tile: int = TOKEN_TILE):
    """Split-K partial sums over the chunk's active slots: block (output block, slot split, chunk), a thread per
    output feature decoding its ``De``-long row of each slot (16-byte loads; a warp reads 32 adjacent rows, i.e.
    one contiguous stretch of the expert's slab); ``part[k, t, o]``, summed by ``sparse_gpu.reduce_kernel_gpu``."""
    ch = Chunking(chunk)
    OB = next(v for v in (threads, 64, 32, 16, 8, 4, 2, 1) if d % v == 0)
    WR = De // PER_WORD
    VW = next((v for v in (4, 2) if WR % v == 0), 1)
    KS = down_splits_gpu(E, d, chunk, threads)
    TT = token_tile  # 1 for decode: no per-nibble test of absent tokens

    @T.prim_func(s_tir=True)
    def blockffn_sparse_down_q4_gpu(h_h: T.handle, q_h: T.handle, s_h: T.handle, idx_h: T.handle,
                                    cnt_h: T.handle, part_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        q = T.match_buffer(q_h, (E, d, WR), "uint32")
        sc = T.match_buffer(s_h, (E, d, De // GROUP_SIZE), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        part = T.match_buffer(part_h, (KS, n_tok, d), "float32")
        for b in T.thread_binding(ch.count(n_tok), thread="blockIdx.z"):
            for ks in T.thread_binding(KS, thread="blockIdx.y"):
                for ob in T.thread_binding(d // OB, thread="blockIdx.x"):
                    for o in T.thread_binding(OB, thread="threadIdx.x"):
                        with T.sblock("down"):
                            wq = T.sblock_alloc_buffer((VW,), "uint32", scope="local")
                            val = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            acc = T.sblock_alloc_buffer((TT,), "float32", scope="local")
                            rng = T.sblock_alloc_buffer((2,), "int32", scope="local")
                            rng[0] = (cnt[b] + KS - 1) // KS
                            rng[1] = T.min(cnt[b], (ks + 1) * rng[0])
                            rng[0] = ks * rng[0]
                            for tt in range((ch.tokens(b, n_tok) + TT - 1) // TT):
                                for u in T.unroll(TT):
                                    acc[u] = T.float32(0)
                                for jj in range(rng[1] - rng[0]):
                                    for i in T.unroll(WR // VW):
                                        for v in T.vectorized(VW):
                                            wq[v] = q[idx[b, rng[0] + jj], ob * OB + o, i * VW + v]
                                        for v in T.unroll(VW):
                                            for k in T.unroll(PER_WORD):
                                                val[0] = _decode(wq[v], k, sc[idx[b, rng[0] + jj], ob * OB + o,
                                                                              (i * VW + v) // WPG])
                                                for u in T.unroll(TT):
                                                    if tt * TT + u < ch.tokens(b, n_tok):
                                                        acc[u] = acc[u] + val[0] * h[ch.start(b) + tt * TT + u,
                                                                                     rng[0] + jj,
                                                                                     (i * VW + v) * PER_WORD + k]
                                for u in T.unroll(TT):
                                    if tt * TT + u < ch.tokens(b, n_tok):
                                        part[ks, ch.start(b) + tt * TT + u, ob * OB + o] = acc[u]

    return blockffn_sparse_down_q4_gpu
