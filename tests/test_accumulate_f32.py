"""AccumulateMatmulF32 on CPU builds: half-precision matmuls sum in fp32 and round once, as numpy computes it."""

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from blockffn.compiler.pipeline import build_pipeline
from blockffn.relax_passes.accumulate_f32 import AccumulateMatmulF32
from blockffn.schedules.dlight_rules import schedule_passes


def matmul_module(dtype: str, k: int, n: int):
    rows = tvm.tirx.Var("rows", "int64")
    x = relax.Var("x", relax.TensorType([1, rows, k], dtype))
    w = relax.Var("w", relax.TensorType([n, k], dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(y)
    return bb.get()


def run(mod, *arrays):
    target = tvm.target.Target({"kind": "llvm"})
    pipe, _ = build_pipeline(target, {}, {"rows": 8}, schedule_passes=schedule_passes(target))
    with target:
        lowered = pipe(mod)
    ex = relax.build(lowered, target, relax_pipeline=tvm.transform.Sequential([]))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


@pytest.mark.parametrize("rows", [1, 5])
def test_f16_matmul_sums_in_f32(rows):
    k, n = 768, 96  # a long reduction: fp16 partial sums would lose bits the fp32 sum keeps
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, rows, k)).astype(np.float16)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float16)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    widen = AccumulateMatmulF32()
    mod = widen(matmul_module("float16", k, n))
    assert widen.rewritten == {"main": 1}
    out = run(mod, x, w)
    assert out.dtype == np.float16
    ref = exact.astype(np.float32).astype(np.float16)  # one rounding, after an fp32 sum
    assert np.abs(out.astype(np.float64) - ref).max() <= 2 * np.spacing(np.abs(ref).max().astype(np.float16))
    narrow = np.abs(run(matmul_module("float16", k, n), x, w).astype(np.float64) - exact).max()
    assert np.abs(out.astype(np.float64) - exact).max() <= narrow  # never worse than summing in fp16


def test_f32_and_mixed_matmuls_are_left_alone():
    widen = AccumulateMatmulF32()
    mod = matmul_module("float32", 64, 8)
    assert tvm_ffi.structural_equal(widen(mod)["main"], mod["main"])
    assert widen.rewritten == {}
