"""Count-bounded sparse BlockFFN kernels for GPU targets (CUDA; written in portable TIR thread bindings).

Same contract as ``sparse_cpu`` (see its docstring).  Grid layout:

* ``union`` - one thread scans the E×T router logits and compacts the union (E ≤ a few hundred: negligible).
* ``up``    - ``blockIdx.x`` = expert slot j (slots ≥ count exit at once), ``threadIdx.x`` = row k of the expert;
  each thread accumulates its dot product over d in fp32, then applies SiLU and the token's gate.
* ``down``  - ``blockIdx.x`` = block of ``OB`` output features, ``threadIdx.x`` = feature (coalesced weight reads),
  looping over the active slots only.

These are correctness-first kernels: the up-projection's per-thread serial reduction is not yet a warp-parallel
GEMV (see the closing notes of the sparse-lowering issue for measured speed on an H200).
"""

from __future__ import annotations

from tvm.script import tirx as T


def union_kernel(E: int, dtype: str):
    zero = T.Cast(dtype, 0)

    @T.prim_func(s_tir=True)
    def blockffn_union_gpu(a0_h: T.handle, idx_h: T.handle, cnt_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        a0 = T.match_buffer(a0_h, (n_tok, E), dtype)
        idx = T.match_buffer(idx_h, (E,), "int32")
        cnt = T.match_buffer(cnt_h, (1,), "int32")
        for bx in T.thread_binding(1, thread="blockIdx.x"):
            for tx in T.thread_binding(1, thread="threadIdx.x"):
                with T.sblock("union"):
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

    return blockffn_union_gpu


def up_kernel_gpu(E: int, De: int, d: int, dtype: str):
    @T.prim_func(s_tir=True)
    def blockffn_sparse_up_gpu(x_h: T.handle, gate_h: T.handle, up_h: T.handle, idx_h: T.handle, cnt_h: T.handle,
                               h_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        x = T.match_buffer(x_h, (n_tok, d), dtype)
        gate = T.match_buffer(gate_h, (n_tok, E), dtype)
        up = T.match_buffer(up_h, (E * De, d), dtype)
        idx = T.match_buffer(idx_h, (E,), "int32")
        cnt = T.match_buffer(cnt_h, (1,), "int32")
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        for j in T.thread_binding(E, thread="blockIdx.x"):
            for k in T.thread_binding(De, thread="threadIdx.x"):
                with T.sblock("up"):
                    acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    if j < cnt[0]:
                        for t in range(n_tok):
                            acc[0] = T.float32(0)
                            for i in range(d):
                                acc[0] = acc[0] + T.Cast("float32", x[t, i]) * T.Cast(
                                    "float32", up[idx[j] * De + k, i])
                            h[t, j, k] = acc[0] / (T.float32(1) + T.exp(T.float32(0) - acc[0])) * T.Cast(
                                "float32", gate[t, idx[j]])

    return blockffn_sparse_up_gpu


def down_kernel_gpu(E: int, De: int, d: int, dtype: str):
    OB = 128 if d % 128 == 0 else (64 if d % 64 == 0 else 32 if d % 32 == 0 else 1)

    @T.prim_func(s_tir=True)
    def blockffn_sparse_down_gpu(h_h: T.handle, down_h: T.handle, idx_h: T.handle, cnt_h: T.handle,
                                 y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        n_tok = T.int64()
        h = T.match_buffer(h_h, (n_tok, E, De), "float32")
        down = T.match_buffer(down_h, (E * De, d), dtype)
        idx = T.match_buffer(idx_h, (E,), "int32")
        cnt = T.match_buffer(cnt_h, (1,), "int32")
        y = T.match_buffer(y_h, (n_tok, d), "float32")
        for ob in T.thread_binding(d // OB, thread="blockIdx.x"):
            for o in T.thread_binding(OB, thread="threadIdx.x"):
                with T.sblock("down"):
                    acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                    for t in range(n_tok):
                        acc[0] = T.float32(0)
                        for j in range(E):
                            if j < cnt[0]:
                                for k in range(De):
                                    acc[0] = acc[0] + h[t, j, k] * T.Cast("float32", down[idx[j] * De + k,
                                                                                          ob * OB + o])
                        y[t, ob * OB + o] = acc[0]

    return blockffn_sparse_down_gpu
