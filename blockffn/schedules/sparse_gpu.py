"""Count-bounded sparse BlockFFN kernels for GPU targets (CUDA; written in portable TIR thread bindings).

Same contract as ``sparse_cpu`` (see its docstring; token chunks as in ``chunking``).  Grid layout:

* ``route`` - block per chunk, thread per expert: the router's gate (ReLU, RMSNorm) and the union; flags in shared
  memory, each active expert's slot is the count of active experts before it (no serial E×T scan by one thread:
  that alone cost more than a small layer's GEMVs).
* ``up``    - a fixed grid of warps (one wave) strides over the chunk's active (slot, expert row) pairs, two rows
  at a time; a warp reads a row with 16-byte vector loads (512 contiguous bytes per step) into registers, then keeps
  one partial dot product per token of a 4-token tile and sums them with TVM's cross-thread allreduce (warp shuffles
  on CUDA).
* ``down``  - split-K GEMV over the active (slot, expert row) pairs.  Block = (a 32·VEC-column tile, a K split,
  chunk); the chunk's ``count·De`` pairs are divided evenly over the K splits at run time, so every SM has work
  whatever the union size; the 8 warps of a block take interleaved rows, each lane loading VEC contiguous columns
  (16 bytes) of an expert row and accumulating a 4-token tile; warps are summed in shared memory and each K split
  writes its partial sums.  ``reduce`` adds the K splits and casts to the model dtype.

Shared memory and TVM's allreduce (not hand-written shuffles) keep one kernel text valid for CUDA, Metal and OpenCL.
"""

from __future__ import annotations

from tvm.script import tirx as T

from blockffn.schedules.chunking import Chunking


def route_kernel(E: int, dtype: str, eps: float, chunk: int | None = None, threads: int = 256):
    """The router's gate and the union in one kernel (one launch per layer fewer than Relax's RMSNorm + a union):
    block per chunk, a thread per expert.  Per token: ``gate = RMSNorm(ReLU(a0)) ⊙ router_norm`` (fp32, the sum of
    squares by TVM's block allreduce), cast to the model dtype; experts' flags go to shared memory and each active
    expert's slot is the count of active experts before it (no serial E×T scan by one thread)."""
    zero = T.Cast(dtype, 0)
    ch = Chunking(chunk)
    NT = min(E, threads)
    KE = (E + NT - 1) // NT

    @T.prim_func(s_tir=True)
    def blockffn_route_gpu(a0_h: T.handle, w_h: T.handle, gate_h: T.handle, idx_h: T.handle, cnt_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        a0 = T.match_buffer(a0_h, (n_tok, E), dtype)
        w = T.match_buffer(w_h, (E,), dtype)
        gate = T.match_buffer(gate_h, (n_tok, E), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        for b in T.thread_binding(ch.count(n_tok), thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                with T.sblock("route"):
                    flags = T.sblock_alloc_buffer((E,), "int32", scope="shared")
                    f = T.sblock_alloc_buffer((KE,), "int32", scope="local")
                    pos = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    one = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    ss = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    for k in range(KE):
                        f[k] = 0
                    for t in range(ch.tokens(b, n_tok)):
                        one[0] = T.float32(0)
                        for k in range(KE):
                            if k * NT + tx < E:
                                one[0] = one[0] + T.max(T.Cast("float32", a0[ch.start(b) + t, k * NT + tx]),
                                                        T.float32(0)) * T.max(
                                    T.Cast("float32", a0[ch.start(b) + t, k * NT + tx]), T.float32(0))
                                if a0[ch.start(b) + t, k * NT + tx] > zero:
                                    f[k] = 1
                        with T.sblock("sum_squares"):
                            T.reads(one[0])
                            T.writes(ss[0])
                            T.attr(T.comm_reducer(lambda x, y: x + y, [T.float32(0)]), "reduce_scope", T.int32(0))
                            T.tvm_thread_allreduce(T.uint32(1), one[0], True, ss[0], tx, dtype="void")
                        for k in range(KE):
                            if k * NT + tx < E:
                                gate[ch.start(b) + t, k * NT + tx] = T.Cast(dtype, T.max(
                                    T.Cast("float32", a0[ch.start(b) + t, k * NT + tx]), T.float32(0)) * T.rsqrt(
                                    ss[0] / T.float32(E) + T.float32(eps)) * T.Cast("float32", w[k * NT + tx]))
                    for k in range(KE):
                        if k * NT + tx < E:
                            flags[k * NT + tx] = f[k]
                    T.tvm_storage_sync("shared")
                    # each active expert's slot = the number of active experts before it
                    for k in range(KE):
                        if k * NT + tx < E:
                            pos[0] = 0
                            for e in range(k * NT + tx):
                                pos[0] = pos[0] + flags[e]
                            if f[k] == 1:
                                idx[b, pos[0]] = k * NT + tx
                    # entries past the count: zero, each by its own thread (the active experts' slots are below it)
                    pos[0] = 0
                    for e in range(E):
                        pos[0] = pos[0] + flags[e]
                    for k in range(KE):
                        if k * NT + tx < E and k * NT + tx >= pos[0]:
                            idx[b, k * NT + tx] = 0
                    if tx == 0:
                        cnt[b] = pos[0]

    return blockffn_route_gpu


def _divisor(n: int, at_most: int) -> int:
    return next(v for v in range(min(n, at_most), 0, -1) if n % v == 0)


VECTOR_BYTES = 16  # one 128-bit load per lane
WARP = 32
TOKEN_TILE = 4  # tokens accumulated per pass over a weight row (registers: TOKEN_TILE x VEC floats per lane)


def token_tile(static_tokens: int | None) -> int:
    """Token tile of a call: the whole call when its token count is static and smaller (decode: 1)."""
    return TOKEN_TILE if static_tokens is None else max(1, min(TOKEN_TILE, static_tokens))


def vector_width(d: int, dtype: str, max_lanes: int = 8) -> int:
    """Elements per 16-byte load that tile ``d`` exactly across a warp (falls back to narrower loads);
    ``max_lanes``: the widest vector type of the target language (Metal has no 8-lane types)."""
    widest = min(max_lanes, VECTOR_BYTES // {"float16": 2, "bfloat16": 2, "float32": 4}[str(dtype)])
    return next((v for v in (widest, 4, 2) if v <= widest and d % (WARP * v) == 0), 1)


@T.macro(hygienic=False)
def warp_sum(acc, u, one, sum1, tot, lane):
    """``tot[u]`` = the sum of ``acc[u]`` over the warp's lanes (TVM's allreduce: shuffles on CUDA, shared memory on
    OpenCL); its operands must be scalars, hence the one-element buffers."""
    one[0] = acc[u]
    with T.sblock("row_sum"):
        T.reads(one[0])
        T.writes(sum1[0])
        T.attr(T.comm_reducer(lambda a, b: a + b, [T.float32(0)]), "reduce_scope", T.int32(0))
        T.tvm_thread_allreduce(T.uint32(1), one[0], True, sum1[0], lane, dtype="void")
    tot[u] = sum1[0]


UP_BLOCKS = 256  # blocks of the up kernel per chunk: about two per SM of a large GPU, one wave, no idle blocks
ROWS_IN_FLIGHT = 2  # expert rows a warp loads before reducing any (more independent 16-byte loads per lane)


def up_kernel_gpu(E: int, De: int, d: int, dtype: str, warps: int = 8, chunk: int | None = None,
                  max_lanes: int = 8, blocks: int = UP_BLOCKS, token_tile: int = TOKEN_TILE):
    """A fixed grid of warps strides over the chunk's ``count·De`` active (slot, row) pairs, ``ROWS_IN_FLIGHT``
    rows at a time: each lane loads its VEC-element pieces of those rows (16-byte loads) into registers, then per
    4-token tile computes one dot product per (row, token), summed across the warp by TVM's allreduce (only for
    tokens that exist: decode reduces one).  A static grid sized for the busiest case would leave most blocks idle
    at a small union; this one is one wave whatever the union.
    ``h[t, j, r] = SiLU(x_t · up[idx[j]·De + r]) · gate[t, idx[j]]`` (fp32)."""
    ch = Chunking(chunk)
    VEC = vector_width(d, dtype, max_lanes)
    LANES = WARP if d % WARP == 0 else 1
    STEPS = d // (LANES * VEC)
    W = warps
    NB = max(1, min(blocks, (E * De + W - 1) // W))
    G = NB * W  # warps of a chunk
    R = ROWS_IN_FLIGHT
    TT = token_tile  # 1 for a single-token call known at compile time (decode): no padded token work

    @T.prim_func(s_tir=True)
    def blockffn_sparse_up_gpu(x_h: T.handle, gate_h: T.handle, up_h: T.handle, idx_h: T.handle, cnt_h: T.handle,
                               h_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        x = T.match_buffer(x_h, (n_tok, d), dtype)
        gate = T.match_buffer(gate_h, (n_tok, E), dtype)
        up = T.match_buffer(up_h, (E * De, d), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        for b in T.thread_binding(ch.count(n_tok), thread="blockIdx.z"):
            for bx in T.thread_binding(NB, thread="blockIdx.x"):
                for w in T.thread_binding(W, thread="threadIdx.y"):
                    for lane in T.thread_binding(LANES, thread="threadIdx.x"):
                        with T.sblock("up"):
                            wv = T.sblock_alloc_buffer((R, STEPS * VEC), dtype, scope="local")
                            xv = T.sblock_alloc_buffer((VEC,), dtype, scope="local")
                            acc = T.sblock_alloc_buffer((R * TT,), "float32", scope="local")
                            one = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            sum1 = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            tot = T.sblock_alloc_buffer((R * TT,), "float32", scope="local")
                            for k in range((cnt[b] * De + G * R - 1) // (G * R)):
                                for rr in T.unroll(R):  # this warp's rows: p = (k·R + rr)·G + warp
                                    if (k * R + rr) * G + bx * W + w < cnt[b] * De:
                                        for i in T.unroll(STEPS):
                                            for v in T.vectorized(VEC):
                                                wv[rr, i * VEC + v] = up[
                                                    idx[b, ((k * R + rr) * G + bx * W + w) // De] * De
                                                    + ((k * R + rr) * G + bx * W + w) % De,
                                                    (i * LANES + lane) * VEC + v]
                                for tt in range((ch.tokens(b, n_tok) + TT - 1) // TT):
                                    for a in T.unroll(R * TT):
                                        acc[a] = T.float32(0)
                                    for u in T.unroll(TT):
                                        if tt * TT + u < ch.tokens(b, n_tok):
                                            for i in T.unroll(STEPS):
                                                for v in T.vectorized(VEC):
                                                    xv[v] = x[ch.start(b) + tt * TT + u, (i * LANES + lane) * VEC + v]
                                                for rr in T.unroll(R):
                                                    for v in T.unroll(VEC):
                                                        acc[rr * TT + u] = acc[rr * TT + u] + T.Cast(
                                                            "float32", wv[rr, i * VEC + v]) * T.Cast("float32", xv[v])
                                    for rr in range(R):
                                        for u in range(TT):
                                            if tt * TT + u < ch.tokens(b, n_tok):
                                                warp_sum(acc, rr * TT + u, one, sum1, tot, lane)
                                    if lane == 0:
                                        for rr in range(R):
                                            if (k * R + rr) * G + bx * W + w < cnt[b] * De:
                                                for u in range(TT):
                                                    if tt * TT + u < ch.tokens(b, n_tok):
                                                        h[ch.start(b) + tt * TT + u,
                                                          ((k * R + rr) * G + bx * W + w) // De,
                                                          ((k * R + rr) * G + bx * W + w) % De] = tot[
                                                            rr * TT + u] / (T.float32(1) + T.exp(
                                                                T.float32(0) - tot[rr * TT + u])) * T.Cast(
                                                            "float32", gate[ch.start(b) + tt * TT + u,
                                                                            idx[b, ((k * R + rr) * G + bx * W + w)
                                                                                // De]])

    return blockffn_sparse_up_gpu


DOWN_ROWS_IN_FLIGHT = 8  # expert rows whose loads a warp of the down kernel issues before accumulating any


def down_splits(E: int, De: int, d: int, dtype: str, chunk: int | None, warps: int = 8,
                target_blocks: int = 512, max_lanes: int = 8) -> int:
    """K splits of the down-projection: enough blocks to fill a large GPU for a single token (decode) whatever the
    union size, never fewer than 8 rows per warp of a full union; prefill chunks already give parallelism."""
    tiles = d // (WARP * vector_width(d, dtype, max_lanes)) if d % WARP == 0 else d
    if chunk is not None:
        return 4
    return max(1, min(target_blocks // max(tiles, 1), (E * De) // (warps * 8)))


def down_kernel_gpu(E: int, De: int, d: int, dtype: str, warps: int = 8, chunk: int | None = None,
                    max_lanes: int = 8, token_tile: int = TOKEN_TILE):
    """Split-K partial sums of the gathered down-projection: ``part[k, t, :] = Σ h[t, slot, r] ·
    down[idx[slot]·De + r, :]`` over the k-th share of the chunk's ``count·De`` (slot, row) pairs."""
    ch = Chunking(chunk)
    VEC = vector_width(d, dtype, max_lanes)
    LANES = WARP if d % WARP == 0 else 1
    COLS = LANES * VEC
    W = warps
    TT = token_tile  # 1 for a single-token call known at compile time (decode): no padded token work
    U = DOWN_ROWS_IN_FLIGHT
    KS = down_splits(E, De, d, dtype, chunk, warps, max_lanes=max_lanes)

    @T.prim_func(s_tir=True)
    def blockffn_sparse_down_gpu(h_h: T.handle, down_h: T.handle, idx_h: T.handle, cnt_h: T.handle,
                                 part_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        down = T.match_buffer(down_h, (E * De, d), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        part = T.match_buffer(part_h, (KS, n_tok, d), "float32")
        for b in T.thread_binding(ch.count(n_tok), thread="blockIdx.z"):
            for ks in T.thread_binding(KS, thread="blockIdx.y"):
                for ct in T.thread_binding(d // COLS, thread="blockIdx.x"):
                    for w in T.thread_binding(W, thread="threadIdx.y"):
                        for lane in T.thread_binding(LANES, thread="threadIdx.x"):
                            with T.sblock("down"):
                                red = T.sblock_alloc_buffer((W, TT, COLS), "float32", scope="shared")
                                wv = T.sblock_alloc_buffer((U, VEC), dtype, scope="local")
                                acc = T.sblock_alloc_buffer((TT, VEC), "float32", scope="local")
                                hv = T.sblock_alloc_buffer((U, TT), "float32", scope="local")
                                hs = T.sblock_alloc_buffer((1,), "float32", scope="local")
                                rng = T.sblock_alloc_buffer((2,), "int32", scope="local")
                                # this split's share [lo, hi) of the chunk's active (slot, row) pairs
                                rng[0] = (cnt[b] * De + KS - 1) // KS
                                rng[1] = T.min(cnt[b] * De, (ks + 1) * rng[0])
                                rng[0] = ks * rng[0]
                                for tt in range((ch.tokens(b, n_tok) + TT - 1) // TT):
                                    for u in T.unroll(TT):
                                        for v in T.unroll(VEC):
                                            acc[u, v] = T.float32(0)
                                    for i in range((rng[1] - rng[0] + W * U - 1) // (W * U)):
                                        for uu in T.unroll(U):  # U rows' loads issued before any is used
                                            if rng[0] + (i * U + uu) * W + w < rng[1]:
                                                for v in T.vectorized(VEC):
                                                    wv[uu, v] = down[
                                                        idx[b, (rng[0] + (i * U + uu) * W + w) // De] * De
                                                        + (rng[0] + (i * U + uu) * W + w) % De, ct * COLS + lane * VEC + v]
                                                for u in T.unroll(TT):
                                                    hv[uu, u] = T.float32(0)
                                                    if tt * TT + u < ch.tokens(b, n_tok):
                                                        hv[uu, u] = h[ch.start(b) + tt * TT + u,
                                                                      (rng[0] + (i * U + uu) * W + w) // De,
                                                                      (rng[0] + (i * U + uu) * W + w) % De]
                                        for uu in T.unroll(U):
                                            if rng[0] + (i * U + uu) * W + w < rng[1]:
                                                for u in T.unroll(TT):
                                                    for v in T.unroll(VEC):
                                                        acc[u, v] = acc[u, v] + hv[uu, u] * T.Cast("float32",
                                                                                                   wv[uu, v])
                                    for u in T.unroll(TT):
                                        for v in T.unroll(VEC):
                                            red[w, u, lane * VEC + v] = acc[u, v]
                                    T.tvm_storage_sync("shared")
                                    # warps sum the W partials, each warp a share of the tile's TT x COLS outputs
                                    for q in range((TT * COLS + W * LANES - 1) // (W * LANES)):
                                        if (q * W + w) * LANES + lane < TT * COLS:
                                            if tt * TT + ((q * W + w) * LANES + lane) // COLS < ch.tokens(b, n_tok):
                                                hs[0] = T.float32(0)
                                                for k in range(W):
                                                    hs[0] = hs[0] + red[k, ((q * W + w) * LANES + lane) // COLS,
                                                                         ((q * W + w) * LANES + lane) % COLS]
                                                part[ks, ch.start(b) + tt * TT + ((q * W + w) * LANES + lane) // COLS,
                                                     ct * COLS + ((q * W + w) * LANES + lane) % COLS] = hs[0]
                                    T.tvm_storage_sync("shared")

    return blockffn_sparse_down_gpu


def reduce_kernel_gpu(d: int, out_dtype: str, splits: int, threads: int = 256):
    """``y[t, c] = Σ_k part[k, t, c]``, cast to ``out_dtype`` (the model dtype: no separate cast kernel)."""
    NT = _divisor(d, threads)

    @T.prim_func(s_tir=True)
    def blockffn_sparse_reduce_gpu(part_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        part = T.match_buffer(part_h, (splits, n_tok, d), "float32")
        y = T.match_buffer(y_h, (n_tok, d), out_dtype)
        for bx in T.thread_binding(n_tok * (d // NT), thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                with T.sblock("reduce"):
                    s = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    s[0] = T.float32(0)
                    for k in range(splits):
                        s[0] = s[0] + part[k, bx // (d // NT), (bx % (d // NT)) * NT + tx]
                    y[bx // (d // NT), (bx % (d // NT)) * NT + tx] = T.Cast(out_dtype, s[0])

    return blockffn_sparse_reduce_gpu
