"""Sparse (union-of-active-experts) vs dense lowering of one BlockFFN layer, and PyTorch's dense FFN.

    python benchmarks/ffn_sparsity.py --target cpu --preset small|xlarge|3b|tiny [--json OUT.json]
        [--tokens 1 8 32] [--active 0.05 0.1 0.2 0.3 0.5 1.0]

    python benchmarks/ffn_sparsity.py --target cuda --preset small --build-only DIR     (here: compile, no GPU needed)
    python benchmarks/ffn_sparsity.py --target cuda --preset small --prebuilt DIR       (GPU machine, TVM runtime only)

The split lets a CUDA library compiled on this machine run on a GPU machine that has only TVM's runtime (see
benchmarks/gpu_check.py for loading the CUDA runtime plugin there).

One BlockFFN layer is compiled twice from the same Relax function: as exported (dense: every expert, exact-zero
gates) and after LowerBlockFFNSparse (router -> union -> gathered up/down kernels).  One token is timed through
entry points with a static [1, 1, d] input, as a model's ``decode`` is compiled; more tokens through the dynamic
ones, as ``batch_verify`` and prefill are.  Router weights are solved so
that exactly the requested fraction of experts is active in the union of the step's tokens.  Prints median ms
(TVM time_evaluator; torch.utils.benchmark for PyTorch) and the ratios, all measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import torch
import torch.nn.functional as F
import tvm
from torch.utils import benchmark as tbench

from blockffn.model import preset_config


def build(cfg, target="cpu", export=None):
    """Both entry points through the product's pipeline and schedules for the target preset."""
    from tvm import relax

    from blockffn.compiler.relax_model import SingleBlockFFN
    from blockffn.relax_passes.lower_sparse_ffn import LowerBlockFFNSparse
    from blockffn.compiler.pipeline import build_pipeline
    from blockffn.schedules.dlight_rules import schedule_passes
    from blockffn.targets import get_target

    mod, _ = SingleBlockFFN(cfg).export(decode_entries=True)
    mod = LowerBlockFFNSparse(["sparse", "sparse_decode"], family="cpu" if target == "cpu" else "gpu")(mod)
    tgt = get_target(target).tvm_target()
    compiler = contextlib.nullcontext()
    if target == "cuda":
        from blockffn.targets.cuda_build import cuda_build

        compiler = cuda_build(str(tgt.arch).removeprefix("sm_"))
    pipe, _ = build_pipeline(tgt, {}, {"n": 64}, schedule_passes=schedule_passes(tgt))
    with compiler:
        ex = tvm.compile(mod, tgt, relax_pipeline=pipe)
    if export:
        ex.export_library(export)
        return None
    dev = tvm.cpu() if target == "cpu" else tvm.cuda()
    return relax.VirtualMachine(ex, dev), dev


def weights(cfg, T, active, rng):
    E, De, d = cfg.num_experts, cfg.expert_size, cfg.hidden_size
    n_act = max(1, round(active * E))
    union = rng.choice(E, n_act, replace=False)
    x = rng.standard_normal((T, d)).astype(np.float32)
    target = -np.ones((T, E))
    for t in range(T):  # every token uses a subset of the union; together they cover it
        mine = union[rng.random(n_act) < 0.8] if T > 1 else union
        target[t, mine] = 1.0
    target[0, union] = 1.0
    w_r = np.linalg.lstsq(x.astype(np.float64), target, rcond=None)[0].T.astype(np.float32)
    return x, [w_r, np.ones(E, np.float32), (rng.standard_normal((E * De, d)) * 0.02).astype(np.float32),
               (rng.standard_normal((E * De, d)) * 0.02).astype(np.float32)], n_act


def load_prebuilt(folder, target):
    import os

    if target == "cuda":
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpu_check import load_cuda_runtime

        load_cuda_runtime()
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cpu() if target == "cpu" else tvm.cuda()
    return VirtualMachine(tvm.runtime.load_module(os.path.join(folder, "ffn.so")), dev), dev


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "medium", "large", "xlarge", "3b"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--active", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--build-only", metavar="DIR", default=None, help="Compile into DIR/ffn.so and stop.")
    ap.add_argument("--prebuilt", metavar="DIR", default=None, help="Time DIR/ffn.so (made by --build-only).")
    args = ap.parse_args()
    cfg = preset_config(args.preset, num_hidden_layers=1)
    if args.build_only:
        import os

        os.makedirs(args.build_only, exist_ok=True)
        build(cfg, args.target, export=os.path.join(args.build_only, "ffn.so"))
        print(f"wrote {args.build_only}/ffn.so")
        return
    vm, dev = load_prebuilt(args.prebuilt, args.target) if args.prebuilt else build(cfg, args.target)
    on_gpu = args.target == "cuda"
    rng = np.random.default_rng(0)
    rows = []
    print(f"preset {args.preset} on {args.target}: d={cfg.hidden_size} E={cfg.num_experts} De={cfg.expert_size}, "
          f"torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'T':>3} {'active':>7} {'dense ms':>9} {'sparse ms':>10} {'torch ms':>9} {'sparse/dense':>13} "
          f"{'sparse/torch':>13} {'dense/torch':>12} {'max rel err':>12}")
    for T in args.tokens:
        for active in args.active:
            x, w, n_act = weights(cfg, T, active, rng)
            params = [tvm.runtime.tensor(a, dev) for a in w]
            xt = tvm.runtime.tensor(x[None], dev)
            # one token: the entry points shaped like a model's decode (static [1, 1, d]); more: verification /
            # prefill shaped (dynamic token count)
            dense_fn, sparse_fn = ("dense_decode", "sparse_decode") if T == 1 else ("dense", "sparse")
            t_dense = vm.time_evaluator(dense_fn, dev, number=1, repeat=5, min_repeat_ms=50)(xt, params).median * 1e3
            t_sparse = vm.time_evaluator(sparse_fn, dev, number=1, repeat=5, min_repeat_ms=50)(xt, params).median * 1e3
            d_out, s_out = vm[dense_fn](xt, params).numpy(), vm[sparse_fn](xt, params).numpy()
            err = np.abs(d_out - s_out).max() / np.abs(d_out).max()
            tdev = "cuda" if on_gpu else "cpu"
            tw = [torch.from_numpy(a).to(tdev) for a in w]
            xx = torch.from_numpy(x).to(tdev)

            def torch_ffn():
                a0 = F.linear(xx, tw[0])
                g = F.relu(a0)
                g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5) * tw[1]
                h = F.silu(F.linear(xx, tw[2])).view(T, cfg.num_experts, cfg.expert_size) * g[..., None]
                return h.view(T, -1) @ tw[3]

            t_torch = tbench.Timer("f()", globals={"f": torch_ffn}).blocked_autorange(min_run_time=0.5).median * 1e3
            frac = n_act / cfg.num_experts
            rows.append({"tokens": T, "active": round(frac, 4), "dense_ms": t_dense, "sparse_ms": t_sparse,
                         "torch_ms": t_torch, "max_rel_err": float(err)})
            print(f"{T:>3} {frac:>7.0%} {t_dense:>9.3f} {t_sparse:>10.3f} {t_torch:>9.3f} "
                  f"{t_sparse / t_dense:>13.3f} {t_sparse / t_torch:>13.2f} {t_dense / t_torch:>12.2f} {err:>12.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
