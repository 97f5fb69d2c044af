"""Count-bounded sparse BlockFFN kernels for GPU targets (CUDA; written in portable TIR thread bindings).

Same contract as ``sparse_cpu`` (see its docstring; token chunks as in ``chunking``).  Grid layout:

* ``union`` - block per chunk, thread per expert: flags in shared memory, each active expert's slot is the count
  of active experts before it (no serial E×T scan by one thread: that alone cost more than a small layer's GEMVs).
* ``up``    - block = (expert slot j, 8 rows of the expert); slots ≥ count exit at once.  128 threads stride over
  the hidden size (coalesced, each weight element read once per token), keep 8 partial dot products in registers
  and sum them with a shared-memory tree; SiLU and the token's gate are applied by the first threads.
* ``down``  - block = (32 output features, token); 8 thread rows split the (active slot, expert row) pairs, each
  row of 32 threads reading 128-byte weight segments, then a shared-memory sum over the 8 partials.

Shared memory (not warp shuffles) keeps one kernel text valid for CUDA, Metal and OpenCL.
"""

from __future__ import annotations

from tvm.script import tirx as T

from blockffn.schedules.chunking import Chunking


def union_kernel(E: int, dtype: str, chunk: int | None = None, threads: int = 256):
    """Block per chunk, a thread per expert (striding past ``threads``): each thread tests its expert over the
    chunk's tokens (coalesced across threads), flags go to shared memory, and each active expert's slot is the
    number of active experts before it.  Slots ≥ count are zeroed by their own thread, so no two threads write
    the same entry."""
    zero = T.Cast(dtype, 0)
    ch = Chunking(chunk)
    NT = min(E, threads)
    KE = (E + NT - 1) // NT

    @T.prim_func(s_tir=True)
    def blockffn_union_gpu(a0_h: T.handle, idx_h: T.handle, cnt_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        a0 = T.match_buffer(a0_h, (n_tok, E), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        for b in T.thread_binding(ch.count(n_tok), thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                with T.sblock("union"):
                    flags = T.sblock_alloc_buffer((E,), "int32", scope="shared")
                    f = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    pos = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    for k in range(KE):
                        if k * NT + tx < E:
                            f[0] = 0
                            for t in range(ch.tokens(b, n_tok)):
                                if a0[ch.start(b) + t, k * NT + tx] > zero:
                                    f[0] = 1
                            flags[k * NT + tx] = f[0]
                    T.tvm_storage_sync("shared")
                    for k in range(KE):
                        if k * NT + tx < E:
                            pos[0] = 0
                            for e in range(k * NT + tx):
                                pos[0] = pos[0] + flags[e]
                            f[0] = flags[k * NT + tx]  # (TVM's sync planner rejects shared loads in conditions)
                            if f[0] == 1:
                                idx[b, pos[0]] = k * NT + tx
                    # entries past the count: zero (the active experts' slots are all below it)
                    pos[0] = 0
                    for e in range(E):
                        pos[0] = pos[0] + flags[e]
                    for k in range(KE):
                        if k * NT + tx < E and k * NT + tx >= pos[0]:
                            idx[b, k * NT + tx] = 0
                    if tx == 0:
                        cnt[b] = pos[0]

    return blockffn_union_gpu


def _divisor(n: int, at_most: int) -> int:
    return next(v for v in range(min(n, at_most), 0, -1) if n % v == 0)


def up_kernel_gpu(E: int, De: int, d: int, dtype: str, threads: int = 128, rows: int = 8, chunk: int | None = None):
    """Block (slot j, chunk of ``rows`` expert rows); its threads stride over d (coalesced weight reads), each
    keeping ``rows`` partial dot products, summed by TVM's cross-thread allreduce (warp shuffles on CUDA/Metal,
    shared memory on OpenCL).  Slots past ``count`` exit at once."""
    NT = next(v for v in (threads, 64, 32, 16, 8, 4, 2, 1) if d % v == 0)  # threads stride d exactly
    RB = _divisor(De, rows)
    ch = Chunking(chunk)

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
        for j in T.thread_binding(E, thread="blockIdx.x"):
            for c in T.thread_binding(De // RB, thread="blockIdx.y"):
                for tx in T.thread_binding(NT, thread="threadIdx.x"):
                    with T.sblock("up"):
                        acc = T.sblock_alloc_buffer((RB,), "float32", scope="local")
                        tot = T.sblock_alloc_buffer((RB,), "float32", scope="local")
                        xv = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        one = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        sum1 = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        for t in range(n_tok):
                            if j < cnt[ch.of(t)]:
                                for r in T.unroll(RB):
                                    acc[r] = T.float32(0)
                                for i0 in range(d // NT):
                                    xv[0] = T.Cast("float32", x[t, i0 * NT + tx])
                                    for r in T.unroll(RB):
                                        acc[r] = acc[r] + xv[0] * T.Cast(
                                            "float32", up[idx[ch.of(t), j] * De + c * RB + r, i0 * NT + tx])
                                for r in range(RB):  # allreduce operands must be scalars (index 0)
                                    one[0] = acc[r]
                                    with T.sblock("row_sum"):
                                        T.reads(one[0])
                                        T.writes(sum1[0])
                                        T.attr(T.comm_reducer(lambda a, b: a + b, [T.float32(0)]), "reduce_scope",
                                               T.int32(0))
                                        T.tvm_thread_allreduce(T.uint32(1), one[0], True, sum1[0], tx, dtype="void")
                                    tot[r] = sum1[0]
                                if tx == 0:
                                    for r in range(RB):
                                        h[t, j, c * RB + r] = tot[r] / (T.float32(1) + T.exp(T.float32(0) - tot[r])) * (
                                            T.Cast("float32", gate[t, idx[ch.of(t), j]]))

    return blockffn_sparse_up_gpu


def down_kernel_gpu(E: int, De: int, d: int, dtype: str, lanes: int = 32, slices: int = 8,
                    chunk: int | None = None):
    """Block (``lanes`` output features, token t); ``slices`` thread rows split the (active slot, expert row)
    pairs, each accumulating coalesced weight-row reads, then a shared-memory sum over the slices.  Pairs past
    ``count * De`` are skipped."""
    OB = _divisor(d, lanes)
    KS = slices
    steps = KS.bit_length() - 1
    pairs = (E * De + KS - 1) // KS
    ch = Chunking(chunk)

    @T.prim_func(s_tir=True)
    def blockffn_sparse_down_gpu(h_h: T.handle, down_h: T.handle, idx_h: T.handle, cnt_h: T.handle,
                                 y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        down = T.match_buffer(down_h, (E * De, d), dtype)
        idx = T.match_buffer(idx_h, (ch.count(n_tok), E), "int32")
        cnt = T.match_buffer(cnt_h, (ch.count(n_tok),), "int32")
        y = T.match_buffer(y_h, (n_tok, d), "float32")
        for ob in T.thread_binding(d // OB, thread="blockIdx.x"):
            for t in T.thread_binding(n_tok, thread="blockIdx.y"):
                for ks in T.thread_binding(KS, thread="threadIdx.y"):
                    for o in T.thread_binding(OB, thread="threadIdx.x"):
                        with T.sblock("down"):
                            red = T.sblock_alloc_buffer((KS, OB), "float32", scope="shared")
                            acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            acc[0] = T.float32(0)
                            for p0 in range(pairs):
                                if p0 * KS + ks < cnt[ch.of(t)] * De:
                                    acc[0] = acc[0] + h[t, (p0 * KS + ks) // De, (p0 * KS + ks) % De] * T.Cast(
                                        "float32", down[idx[ch.of(t), (p0 * KS + ks) // De] * De + (p0 * KS + ks) % De,
                                                        ob * OB + o])
                            red[ks, o] = acc[0]
                            T.tvm_storage_sync("shared")
                            for step in T.unroll(steps):
                                if ks < T.shift_right(KS, step + 1):
                                    red[ks, o] = red[ks, o] + red[ks + T.shift_right(KS, step + 1), o]
                                T.tvm_storage_sync("shared")
                            if ks == 0:
                                y[t, ob * OB + o] = red[0, o]

    return blockffn_sparse_down_gpu
