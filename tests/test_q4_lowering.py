"""q4 BlockFFN lowering: sparse q4 kernels == dense q4 lowering == numpy on the same quantized weights, the
GPU q4 kernels compile for CUDA/Metal/OpenCL, and no target materialises a dequantized weight."""

import re
import shutil

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from blockffn.compiler.quantization import SCHEMES, dequantize, quantize
from blockffn.compiler.relax_model import SingleBlockFFN, export_model
from blockffn.compiler.relax_quant import DEQUANTIZE_BLOCK
from blockffn.relax_passes.lower_sparse_ffn import LowerBlockFFNSparse
from blockffn.schedules import sparse_q4
from tests.conftest import small_config

SCHEME_NAMES = sorted(SCHEMES)


@pytest.fixture(scope="module")
def q4_vms():
    cfg = small_config()
    vms = {}
    for name, scheme in SCHEMES.items():
        for chunk in (None, 4):  # one union per call (decode/verify), one per 4 tokens (chunked-union prefill)
            mod, _ = SingleBlockFFN(cfg, scheme.dtype, scheme).export()
            mod = LowerBlockFFNSparse({"sparse": chunk})(mod)
            vms[name, chunk] = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    return cfg, vms


def numpy_ffn(x, w_r, w_n, up, down, E, De, eps):
    a0 = x @ w_r.T
    a1 = np.maximum(a0, 0)
    g = a1 / np.sqrt((a1 ** 2).mean(-1, keepdims=True) + eps) * w_n
    h = x @ up.T
    h = h / (1 + np.exp(-h))
    return (h.reshape(len(x), E, De) * g[:, :, None]).reshape(len(x), E * De) @ down.T


def q4_reference(x, w_r, w_n, up_q, up_s, down_q, down_s, cfg):
    """fp64 numpy layer over the dequantized expert slabs (up [E, De, d] and down [E, d, De], back to HF layout)."""
    E, De, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    up = dequantize(up_q, up_s).astype(np.float64).reshape(E * De, d)
    down = dequantize(down_q, down_s).astype(np.float64).transpose(1, 0, 2).reshape(d, E * De)
    return numpy_ffn(x.astype(np.float64), w_r.astype(np.float64), w_n.astype(np.float64), up, down, E, De,
                     cfg.rms_norm_eps)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SCHEME_NAMES), st.sampled_from([None, 4]), st.integers(1, 24),
       st.sampled_from(["none", "all", "random", "sparse"]), st.integers(0, 2**16))
def test_sparse_q4_equals_dense_q4_and_numpy(q4_vms, name, chunk, T, kind, seed):
    cfg, vms = q4_vms
    scheme, vm = SCHEMES[name], vms[name, chunk]
    E, De, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    rng = np.random.default_rng(seed)
    mask = {"none": np.zeros((T, E), bool), "all": np.ones((T, E), bool)}.get(kind)
    if mask is None:
        mask = rng.random((T, E)) < (0.5 if kind == "random" else 0.08)
    x = rng.standard_normal((T, d)).astype(scheme.dtype)
    target = np.where(mask, rng.random((T, E)) + 0.5, -(rng.random((T, E)) + 0.5))
    w_r = np.linalg.lstsq(x.astype(np.float64), target, rcond=None)[0].T.astype(scheme.dtype)
    mask = (x.astype(np.float32) @ w_r.astype(np.float32).T) > 0  # the pattern the rounded router realises
    w_n = rng.uniform(0.5, 1.5, E).astype(scheme.dtype)
    up_q, up_s = quantize(rng.standard_normal((E, De, d)) * 0.05, scheme)
    down_q, down_s = quantize(rng.standard_normal((E, d, De)) * 0.05, scheme)
    params = [tvm.runtime.tensor(a) for a in (w_r, w_n, up_q, up_s, down_q, down_s)]
    xt = tvm.runtime.tensor(x[None])
    sparse = vm["sparse"](xt, params).numpy()[0].astype(np.float64)
    dense = vm["dense"](xt, params).numpy()[0].astype(np.float64)
    ref = q4_reference(x, w_r, w_n, up_q, up_s, down_q, down_s, cfg)
    if not mask.any():
        assert not sparse.any()
        return
    scale = np.abs(ref).max()
    # fp16: the dense path rounds the up-projection output h to fp16, the sparse kernels keep it in fp32, so they
    # differ by a few fp16 ulps (one ulp at the output's scale is ≈ 5e-4 of it)
    assert np.abs(sparse - dense).max() / scale <= (1e-5 if scheme.dtype == "float32" else 2e-3)
    # fp16 models also round the router, gate and output to fp16 (≈ 1e-3 each) against this fp64 reference
    assert np.abs(sparse - ref).max() / scale <= (1e-5 if scheme.dtype == "float32" else 5e-3)


GPU_TARGETS = {"metal": {"kind": "metal", "max_threads_per_block": 256},
               "opencl": {"kind": "opencl"},
               "cuda": {"kind": "cuda", "arch": "sm_87"}}


@pytest.mark.parametrize("kind", sorted(GPU_TARGETS))
@pytest.mark.parametrize("name", SCHEME_NAMES)
def test_gpu_q4_kernels_compile(kind, name):
    import contextlib

    compiler = contextlib.nullcontext()
    if kind == "cuda":
        if shutil.which("nvcc") is None:
            pytest.skip("nvcc (CUDA toolkit) not installed")
        from blockffn.targets.cuda_build import cuda_build

        compiler = cuda_build("87")
    dtype = SCHEMES[name].dtype
    cfg = small_config()
    E, De, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    mod = tvm.IRModule({"up": sparse_q4.up_kernel_gpu(E, De, d, dtype).with_attr("global_symbol", "up"),
                        "down": sparse_q4.down_kernel_gpu(E, De, d, dtype).with_attr("global_symbol", "down")})
    target = tvm.target.Target({**GPU_TARGETS[kind], "host": {"kind": "llvm"}})
    with compiler:
        device_mod = tvm.compile(mod, target=target).mod.imports[0]
    assert device_mod.kind == kind
    if kind != "cuda":  # cuda kernels are embedded as a compiled fatbin, not source
        source = device_mod.inspect_source()
        assert "up_kernel" in source and "down_kernel" in source


def _dequantize_buffers_in_global_memory(func) -> list[str]:
    """Buffers that a block named dequantize* writes and that live in global memory (a materialised
    full-precision weight); read from the TVMScript text (the 0.27 wheel exposes no TIR visitor to Python)."""
    text = func.script()
    written = re.findall(r'T\.sblock\("' + DEQUANTIZE_BLOCK + r'[^"]*"\).*?T\.writes\((\w+)\[', text, re.S)
    local = set(re.findall(r'(\w+) = T\.sblock_alloc_buffer\([^\n]*scope="(?!global")', text))
    return [b for b in written if b not in local]


@pytest.mark.parametrize("preset", ["cpu", "cuda", "metal", "android"])
def test_no_target_materialises_dequantized_weights(preset):
    from blockffn.compiler.pipeline import _backend_pipeline
    from blockffn.schedules.dlight_rules import metal_simdgroup_disabled, reduction_rules_guarded, schedule_passes
    from blockffn.targets import get_target

    cfg = small_config()
    p = get_target(preset)
    target = p.tvm_target("sm_87" if p.target["kind"] == "cuda" else None)
    scheme = SCHEMES["q4f16_1"]
    mod, _, _ = export_model(cfg, scheme.dtype, target, scheme)
    stages = _backend_pipeline(target)
    passes = ([LowerBlockFFNSparse(["decode", "batch_decode"], family=p.kernel_family),
               relax.transform.FuseTransposeMatmul()] + stages.library_dispatch_passes(target)
              + stages.legalize_passes(target) + schedule_passes(target))
    with target, metal_simdgroup_disabled(target), reduction_rules_guarded():
        mod = tvm.transform.Sequential(passes)(mod)
    q4_funcs = {gv.name_hint: f for gv, f in mod.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc) and "q4" in gv.name_hint}
    assert any("sparse_up_q4" in n for n in q4_funcs) and any("q4_matmul" in n for n in q4_funcs)
    for name, func in q4_funcs.items():
        needs_schedule = p.kernel_family == "gpu" or DEQUANTIZE_BLOCK in func.script()  # CPU gathers need none
        assert func.attrs.get("tirx.is_scheduled") or not needs_schedule, f"{name} left unscheduled"
        assert not _dequantize_buffers_in_global_memory(func), f"{name} materialises a dequantized weight"
