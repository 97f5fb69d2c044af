"""The CPU matmul rule: every dense matmul of a model gets scheduled, and scheduled kernels stay exact."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from blockffn.compiler.pipeline import build_pipeline
from blockffn.relax_passes.accumulate_f32 import AccumulateMatmulF32
from blockffn.schedules.dlight_rules import schedule_passes
from blockffn.targets import get_target


class _Linears(nn.Module):
    """NT matmul + SiLU epilogue (nn.Linear layout), NN matmul (weight [k, j]), a GEMV-sized router."""

    def __init__(self, d, f, r, dtype="float32"):
        self.up = nn.Linear(d, f, bias=False, dtype=dtype)
        self.down_t = nn.Parameter((f, d), dtype)
        self.router = nn.Linear(d, r, bias=False, dtype=dtype)

    def forward(self, x):
        h = nn.silu(self.up(x))
        return nn.op.matmul(h, self.down_t), nn.relu(self.router(x))


def _build(d, f, r, rows="n", dtype="float32"):
    mod, params = _Linears(d, f, r, dtype).export_tvm(
        spec={"forward": {"x": nn.spec.Tensor([1, rows, d], dtype)}})
    tgt = get_target("cpu").tvm_target()
    graph = [AccumulateMatmulF32()] if dtype == "float16" else []  # as compile does: cast (and relu) epilogues
    pipe, _ = build_pipeline(tgt, {}, {"n": 64}, graph_passes=graph, schedule_passes=schedule_passes(tgt))
    return mod, [name for name, _ in params], tgt, pipe


@pytest.mark.parametrize("d,f,r", [(64, 96, 8), (48, 40, 3), (100, 36, 5)])
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("static", [False, True])
def test_scheduled_matmuls_match_numpy(d, f, r, n, static):
    mod, names, tgt, pipe = _build(d, f, r, n if static else "n")
    vm = relax.VirtualMachine(tvm.compile(mod, tgt, relax_pipeline=pipe), tvm.cpu())
    rng = np.random.default_rng(d + f + n)
    w = {"up.weight": rng.standard_normal((f, d)), "down_t": rng.standard_normal((f, d)) * 0.1,
         "router.weight": rng.standard_normal((r, d))}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    x = rng.standard_normal((1, n, d)).astype(np.float32)
    out, gate = vm["forward"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(w[k]) for k in names])
    up = x[0].astype(np.float64) @ w["up.weight"].T
    ref = (up / (1 + np.exp(-up))) @ w["down_t"]
    np.testing.assert_allclose(out.numpy()[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(gate.numpy()[0], np.maximum(x[0] @ w["router.weight"].T, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows", ["n", 1, 5])  # dynamic (prefill/verify), one static token (decode), static batch
def test_every_matmul_is_scheduled(rows, dtype):
    mod, _, tgt, pipe = _build(64, 96, 8, rows, dtype)
    with tgt:
        lowered = pipe(mod)
    kernels = {gv.name_hint: f for gv, f in lowered.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    matmuls = [name for name in kernels if "matmul" in name]
    assert len(matmuls) == 3, sorted(kernels)
    for name in matmuls:
        assert "tirx.is_scheduled" in kernels[name].attrs, name
        assert "parallel" in kernels[name].script(), name


def test_half_blockffn_layer_matmuls_are_scheduled():
    """The dense BlockFFN body in fp16 after AccumulateMatmulF32: the router's matmul -> cast -> relu chain and the
    expert matmuls all get the rule's schedule (a declined kernel stays a scalar loop nest, ~10x slower)."""
    from blockffn.compiler.relax_model import SingleBlockFFN
    from blockffn.model import preset_config

    mod, _ = SingleBlockFFN(preset_config("small"), dtype="float16").export(decode_entries=True)
    tgt = get_target("cpu").tvm_target()
    pipe, _ = build_pipeline(tgt, {}, {"n": 64}, graph_passes=[AccumulateMatmulF32()],
                             schedule_passes=schedule_passes(tgt))
    with tgt:
        lowered = pipe(mod)
    matmuls = {gv.name_hint: f for gv, f in lowered.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and "matmul" in gv.name_hint}
    assert len(matmuls) >= 3
    unscheduled = [name for name, f in matmuls.items() if "parallel" not in f.script()]
    assert not unscheduled, unscheduled
