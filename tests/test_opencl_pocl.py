"""The android (OpenCL) build on a real OpenCL implementation: PoCL on this CPU, driven through pyopencl.

Every OpenCL kernel embedded in the android library is compiled by the OpenCL driver, and one BlockFFN layer,
lowered by the compile pipeline exactly as for the phone (sparse lowering, GPU kernels, dlight schedules), runs
kernel by kernel on the device and matches numpy.  Skipped, with the reason, without PoCL or pyopencl.
"""

import numpy as np
import pytest
import tvm

from blockffn import default_model_path
from blockffn.artifacts.layout import storage_dtype
from blockffn.compiler.compile import CompileOptions, PhaseTimer, build_library, system_lib_prefix
from blockffn.compiler.pipeline import build_pipeline
from blockffn.compiler.relax_model import SingleBlockFFN
from blockffn.model import load_model
from blockffn.relax_passes.lower_dense_ffn import LowerBlockFFNDenseDecodeGPU
from blockffn.relax_passes.lower_sparse_ffn import LowerBlockFFNSparse
from blockffn.schedules.dlight_rules import reduction_rules_guarded, schedule_passes
from blockffn.targets import get_target
from tests.conftest import small_config
from tests.pocl_runner import PoCLInterpreter, kernel_names, kernel_programs, opencl_sources
from tests.test_sparse_lowering import numpy_dense

cl = pytest.importorskip("pyopencl", reason="pyopencl not installed (pip install pyopencl)")


@pytest.fixture(scope="module")
def device():
    try:
        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
    except cl.Error as e:  # no ICD loader / no platform
        pytest.skip(f"no OpenCL platform ({e}); Debian: apt-get install pocl-opencl-icd")
    if not devices:
        pytest.skip("no OpenCL device; Debian: apt-get install pocl-opencl-icd")
    dev = next((d for d in devices if "Portable Computing Language" in d.platform.name), devices[0])
    ctx = cl.Context([dev])
    return dev, ctx, cl.CommandQueue(ctx)


@pytest.mark.parametrize("target,quantization", [("android", "q0f32"), ("android-adreno", "q0f32"),
                                                 ("android", "q0f16")])
def test_every_android_kernel_compiles_with_the_opencl_driver(device, target, quantization):
    dev, ctx, _ = device
    if quantization == "q0f16" and "cl_khr_fp16" not in dev.extensions:
        pytest.skip(f"{dev.name} ({dev.platform.name}) has no cl_khr_fp16 for the fp16 kernels")
    preset = get_target(target)
    cfg = load_model(default_model_path(), dtype="float32").config
    built = build_library(CompileOptions(model_dir=default_model_path(), target=target, quantization=quantization),
                          cfg, preset, preset.tvm_target(), storage_dtype(quantization), 256, 64,
                          system_lib_prefix("blockffn-tiny", quantization),
                          PhaseTimer())
    (source,) = opencl_sources(built.executable.mod)
    programs = kernel_programs(source)
    assert len(programs) == len(set(kernel_names(source))) > 20  # model, KV-cache, sparse-FFN, sampling kernels
    assert any("blockffn_sparse" in name for name in programs)  # the sparse FFN kernels are among them
    for name, program in programs.items():
        built_program = cl.Program(ctx, program).build()
        assert name in built_program.kernel_names.split(";")
    print(f"{target} {quantization}: {len(programs)} OpenCL kernels built by {dev.platform.name} on {dev.name}")


@pytest.fixture(scope="module", params=[("android", None), ("android-adreno", None), ("android", 4)],
                ids=["android", "android-adreno", "android-chunk4"])
def ffn_on_device(request, device):
    """One BlockFFN layer (dense and sparse entry points) scheduled for the preset, run on the OpenCL device;
    the sparse entry takes one union per call, or one per 4 tokens (chunked-union prefill)."""
    _, ctx, queue = device
    preset_name, chunk = request.param
    preset = get_target(preset_name)
    target = preset.tvm_target()
    cfg = small_config()
    mod, _ = SingleBlockFFN(cfg).export(decode_entries=True)
    mod = LowerBlockFFNSparse({"sparse": chunk, "sparse_decode": None}, family=preset.kernel_family)(mod)
    mod = LowerBlockFFNDenseDecodeGPU()(mod)  # dense_decode: the split-K down kernel over every expert
    pipeline, _ = build_pipeline(target, {}, {"n": 64}, schedule_passes=schedule_passes(target), through="schedule")
    with target:
        scheduled = pipeline(mod)
    return cfg, PoCLInterpreter(scheduled, target, ctx, queue)


def _layer_inputs(cfg, T, active, rng):
    """x and weights whose router activates exactly ``active`` (a [T, E] mask); float32."""
    E, De, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    x = rng.standard_normal((T, d))
    target = np.where(active, rng.random((T, E)) + 0.5, -(rng.random((T, E)) + 0.5))
    w_router = np.linalg.lstsq(x, target, rcond=None)[0].T
    weights = [w_router, rng.uniform(0.5, 1.5, E), rng.standard_normal((E * De, d)) * 0.05,
               rng.standard_normal((E * De, d)) * 0.05]
    x32, w32 = x.astype("float32"), [w.astype("float32") for w in weights]
    assert np.array_equal(x32 @ w32[0].T > 0, active)
    return x32, w32


@pytest.mark.parametrize("T,pattern", [(1, "sparse"), (1, "none"), (5, "sparse"), (17, "half"), (17, "all")])
def test_sparse_ffn_kernels_on_opencl_match_numpy(ffn_on_device, T, pattern):
    cfg, run = ffn_on_device
    E = cfg.num_experts
    rng = np.random.default_rng(T * 31 + len(pattern))
    active = {"none": np.zeros((T, E), bool), "all": np.ones((T, E), bool),
              "half": rng.random((T, E)) < 0.5}.get(pattern)
    if active is None:
        active = np.zeros((T, E), bool)
        active[:, rng.choice(E, 3, replace=False)] = rng.random((T, 3)) < 0.7
        active[0, 0] = True
    x, w = _layer_inputs(cfg, T, active, rng)
    launched = len(run.launched)
    sparse = run("sparse", x[None], tuple(w))[0]
    sparse_kernels = run.launched[launched:]
    dense = run("dense", x[None], tuple(w))[0]
    assert any(k.startswith("blockffn_sparse") for k in sparse_kernels)  # the sparse lowering ran on the device
    ref = numpy_dense(*(a.astype(np.float64) for a in (x, *w)), E, cfg.expert_size, cfg.rms_norm_eps)
    assert np.isfinite(sparse).all() and np.isfinite(dense).all()
    if not active.any():
        assert not sparse.any() and not dense.any()
        return
    scale = np.abs(ref).max()
    assert np.abs(sparse - ref).max() / scale <= 1e-5
    assert np.abs(dense - ref).max() / scale <= 1e-5
    if T == 1:  # the static single-token entry points, as a model's decode is compiled
        launched = len(run.launched)
        dense_decode = run("dense_decode", x[None], tuple(w))[0]
        assert any(k.startswith("blockffn_sparse_down") for k in run.launched[launched:])
        sparse_decode = run("sparse_decode", x[None], tuple(w))[0]
        assert np.abs(dense_decode - ref).max() / scale <= 1e-5
        assert np.abs(sparse_decode - ref).max() / scale <= 1e-5


@pytest.fixture(scope="module", params=[None, 4], ids=["call-union", "chunk4"])
def q4_ffn_on_device(request, device):
    """One q4f32_1 BlockFFN layer lowered with the GPU q4 kernels (warp-per-row up, split-K down + reduce)."""
    from blockffn.compiler.quantization import SCHEMES

    _, ctx, queue = device
    scheme = SCHEMES["q4f32_1"]
    target = get_target("android").tvm_target()
    cfg = small_config()
    mod, _ = SingleBlockFFN(cfg, scheme.dtype, scheme).export(decode_entries=True)
    mod = LowerBlockFFNSparse({"sparse": request.param, "sparse_decode": None}, family="gpu")(mod)
    pipeline, _ = build_pipeline(target, {}, {"n": 64}, schedule_passes=schedule_passes(target), through="schedule")
    with target, reduction_rules_guarded():  # as blockffn-compile lowers GPU targets
        scheduled = pipeline(mod)
    return cfg, scheme, PoCLInterpreter(scheduled, target, ctx, queue)


@pytest.mark.parametrize("T,pattern", [(1, "sparse"), (5, "half"), (17, "all"), (3, "none")])
def test_q4_sparse_kernels_on_opencl_match_dequantized_numpy(q4_ffn_on_device, T, pattern):
    from blockffn.compiler.quantization import quantize
    from tests.test_q4_lowering import q4_reference

    cfg, scheme, run = q4_ffn_on_device
    E, De, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    rng = np.random.default_rng(T * 7 + len(pattern))
    active = {"none": np.zeros((T, E), bool), "all": np.ones((T, E), bool),
              "half": rng.random((T, E)) < 0.5}.get(pattern)
    if active is None:
        active = np.zeros((T, E), bool)
        active[:, rng.choice(E, 3, replace=False)] = True
    x, (w_r, w_n, _, _) = _layer_inputs(cfg, T, active, rng)
    up_q, up_s = quantize(rng.standard_normal((E, De, d)) * 0.05, scheme)
    down_q, down_s = quantize(rng.standard_normal((E, d, De)) * 0.05, scheme)
    launched = len(run.launched)
    sparse = run("sparse", x[None], (w_r, w_n, up_q, up_s, down_q, down_s))[0]
    assert any(k.startswith("blockffn_sparse_down_q4") for k in run.launched[launched:])
    ref = q4_reference(x, w_r, w_n, up_q, up_s, down_q, down_s, cfg)
    if not active.any():
        assert not sparse.any()
        return
    assert np.abs(sparse - ref).max() / np.abs(ref).max() <= 1e-5
    if T == 1:  # the static single-token entry (decode): kernels with a token tile of 1
        launched = len(run.launched)
        decode = run("sparse_decode", x[None], (w_r, w_n, up_q, up_s, down_q, down_s))[0]
        assert any(k.startswith("blockffn_sparse_down_q4") and "_t1" in k for k in run.launched[launched:])
        assert np.abs(decode - ref).max() / np.abs(ref).max() <= 1e-5


@pytest.mark.parametrize("T,count", [(1, 5), (3, 8), (6, 1)])
def test_up_kernel_strides_over_more_rows_than_warps(device, T, count):
    """The GPU up kernel on a grid of one block (8 warps) over up to 8 experts × 12 rows: each warp takes several
    rounds of ROWS_IN_FLIGHT rows, the last one partial; slots ≥ count stay unwritten."""
    from blockffn.schedules.sparse_gpu import up_kernel_gpu

    _, ctx, queue = device
    E, De, d = 8, 12, 64  # De: rounds of 16 rows end inside an expert
    rng = np.random.default_rng(T + count)
    x = rng.standard_normal((T, d)).astype("float32")
    gate = rng.random((T, E)).astype("float32")
    up = rng.standard_normal((E * De, d)).astype("float32")
    idx = np.zeros((1, E), "int32")
    idx[0, :count] = rng.choice(E, count, replace=False)
    run = PoCLInterpreter(tvm.IRModule({"up": up_kernel_gpu(E, De, d, "float32", blocks=1)}),
                          get_target("android").tvm_target(), ctx, queue)
    h = np.full((T, E, De), np.nan, "float32")
    run.run_primfunc("up", [x, gate, up, idx, np.array([count], "int32")], [h])
    for j in range(count):
        e = idx[0, j]
        z = x.astype(np.float64) @ up[e * De:(e + 1) * De].T.astype(np.float64)
        want = z / (1 + np.exp(-z)) * gate[:, e:e + 1]
        np.testing.assert_allclose(h[:, j], want, rtol=1e-5, atol=1e-5)
    assert np.isnan(h[:, count:]).all()


@pytest.fixture(scope="module")
def verify_kernels(device):
    """The tiny vanilla-attention model scheduled for the phone: verification's own low-row matmul kernels."""
    from blockffn.compiler.relax_model import export_model

    _, ctx, queue = device
    target = get_target("android").tvm_target()
    mod, _, _ = export_model(small_config("gqa"), "float32", target)
    pipeline, _ = build_pipeline(target, {}, {"seq_len": 64, "batch_size": 4, "total_seq_len": 256},
                                 schedule_passes=schedule_passes(target), through="schedule")
    with target:
        scheduled = pipeline(mod)
    return scheduled, PoCLInterpreter(scheduled, target, ctx, queue)


@pytest.mark.parametrize("T", [1, 3, 8, 13])
def test_verify_low_row_kernels_match_the_prefill_kernels(verify_kernels, T):
    """Each ``*_rows8`` kernel (dlight's LowBatchGEMV, `blockffn.schedules.low_batch`) computes what the kernel it
    was copied from computes under the GEMM schedule prefill keeps, for row counts below, at and above 8."""
    mod, run = verify_kernels
    low = [gv.name_hint for gv in mod.functions if gv.name_hint.endswith("_rows8")]
    assert len(low) >= 2  # at least the attention projections (the LM head shares one of their kernels in fp32)
    rng = np.random.default_rng(T)
    for name in low:
        func = mod[name]
        shapes = [[int(s) if isinstance(s, tvm.tirx.IntImm) else T for s in p.ty.shape] for p in func.params]
        dtypes = [str(p.ty.dtype) for p in func.params]
        inputs = [rng.standard_normal(s).astype(t) for s, t in zip(shapes[:-1], dtypes[:-1])]
        got, want = (np.full(shapes[-1], np.nan, dtypes[-1]) for _ in range(2))
        run.run_primfunc(name, inputs, [got])
        run.run_primfunc(name[: -len("_rows8")], inputs, [want])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=name)


def _pack_q4(codes):
    """codes [..., K] in 0..15 -> uint32 words [..., K/8], code j of a word at bits 4·(j % 8) (written out bit by
    bit here, independently of `blockffn.compiler.quantization`)."""
    words = np.zeros((*codes.shape[:-1], codes.shape[-1] // 8), np.uint64)
    for j in range(8):
        words |= codes[..., j::8].astype(np.uint64) << np.uint64(4 * j)
    return words.astype(np.uint32)


@pytest.mark.parametrize("d", [256, 1024], ids=["d256-lane-words", "d1024-16B-loads"])
@pytest.mark.parametrize("T,chunk", [(1, None), (5, None), (13, None), (5, 4), (13, 4)])
def test_q4_gpu_up_and_down_kernels_match_numpy(device, T, chunk, d):
    """`sparse_q4.up_kernel_gpu` / `down_kernel_gpu` alone on the device, at decode (T=1, token tile 1), prefill and
    tree-verify token counts, one union per call or per 4 tokens, over a union of fewer slots than experts, against
    fp64 numpy on weights dequantized as (code − 7)·scale: up fills h[t, slot] = silu(x·up_e)·gate_e for the slots
    below the count (the others stay unwritten); down's split-K partials sum to Σ_slot h[t, slot]·down_e."""
    from blockffn.schedules.chunking import Chunking
    from blockffn.schedules.sparse_q4 import down_kernel_gpu, down_splits_gpu, up_kernel_gpu

    _, ctx, queue = device
    E, De, G = 8, 64, 32
    rng = np.random.default_rng(T * 10 + (chunk or 0) + d)
    tile = 1 if T == 1 else 4
    mod = tvm.IRModule({"up": up_kernel_gpu(E, De, d, "float32", chunk, token_tile=tile),
                        "down": down_kernel_gpu(E, De, d, "float32", chunk, token_tile=tile)})
    run = PoCLInterpreter(mod, get_target("android").tvm_target(), ctx, queue)
    up_codes, down_codes = rng.integers(0, 16, (E, De, d)), rng.integers(0, 16, (E, d, De))
    up_s, down_s = (rng.uniform(0.005, 0.02, shape).astype("float32") for shape in ((E, De, d // G), (E, d, De // G)))
    up = (up_codes - 7) * np.repeat(up_s.astype(np.float64), G, -1)  # [E, De, d]
    down = (down_codes - 7) * np.repeat(down_s.astype(np.float64), G, -1)  # [E, d, De]
    x = rng.standard_normal((T, d)).astype("float32")
    gate = rng.random((T, E)).astype("float32")
    n_chunks = Chunking(chunk).count(T)
    counts = rng.integers(1, E, n_chunks).astype("int32")  # a union of 1..E-1 of the E experts per chunk
    idx = np.zeros((n_chunks, E), "int32")
    for b, c in enumerate(counts):
        idx[b, :c] = rng.choice(E, c, replace=False)
    tokens = [range(T)] if chunk is None else [range(b * chunk, min(T, (b + 1) * chunk)) for b in range(n_chunks)]

    h = np.full((T, E, De), np.nan, "float32")
    run.run_primfunc("up", [x, gate, _pack_q4(up_codes), up_s, idx, counts], [h])
    for b, ts in enumerate(tokens):
        for t in ts:
            for j in range(counts[b]):
                z = up[idx[b, j]] @ x[t].astype(np.float64)
                np.testing.assert_allclose(h[t, j], z / (1 + np.exp(-z)) * gate[t, idx[b, j]], rtol=1e-4, atol=1e-5)
            assert np.isnan(h[t, counts[b]:]).all()

    h_in = rng.standard_normal((T, E, De)).astype("float32")
    part = np.full((down_splits_gpu(E, d, chunk), T, d), np.nan, "float32")
    run.run_primfunc("down", [h_in, _pack_q4(down_codes), down_s, idx, counts], [part])
    want = np.zeros((T, d))
    for b, ts in enumerate(tokens):
        for t in ts:
            want[t] = sum(down[idx[b, j]] @ h_in[t, j].astype(np.float64) for j in range(counts[b]))
    np.testing.assert_allclose(part.sum(0), want, rtol=1e-4, atol=1e-4)
