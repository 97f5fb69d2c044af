"""Whole-model GPU decode at official shapes: dense vs sparse, at forced activation fractions, with and without CUDA
graphs, plus the cost of one verification call of k tokens relative to one decode step.

Two halves, so that the GPU machine needs only the TVM runtime and PyTorch:

    # where the TVM compiler is (no GPU needed): libraries from the config alone, one per --dtype and graph mode
    python benchmarks/gpu_decode.py --build-only --preset 3b --dtype q0f16 --dtype q4f16_1 -o BENCH
    # on the GPU: forced-routing weights (blockffn.model.forced_routing, the official-engine anchor's construction)
    # written in each library's parameter order, then greedy decode timed through the Engine
    python benchmarks/gpu_decode.py --prebuilt BENCH --fractions 0.125,0.25,0.5 --json OUT.json

Bytes/token are the weights one decode step reads (attention, router, norms, LM head, one embedding row and the
active fraction of the experts; KV cache excluded); the bandwidth is a device-to-device copy measured in the same
run (read + write bytes).  Times are medians of --runs generations after a warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = [1, 2301, 517, 9012, 33, 4410, 880, 61234]


def build(args) -> None:
    from blockffn.compiler.compile import CompileOptions, compile_model
    from blockffn.compiler.gen_config import gen_config
    from blockffn.model import preset_config

    out = Path(args.output)
    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    preset_config(args.preset).save(model / "config.json")  # the library needs the config only
    for dtype in args.dtype:
        for graph in {"both": (False, True), "on": (True,), "off": (False,)}[args.cuda_graph]:
            folder = out / f"{dtype}-{'graph' if graph else 'plain'}"
            r = compile_model(CompileOptions(model_dir=model, target="cuda", arch=args.arch, quantization=dtype,
                                             output=folder / "lib.so", context_window=args.context_window,
                                             draft="none", cuda_graph=graph, overwrite=True))
            gen_config(model, dtype, folder, args.context_window, overwrite=True)
            print(f"{folder}: {sum(r['seconds'].values()):.0f} s, peak RSS {max(r['peak_rss_mb'].values()):.0f} MiB")
    (out / "bench.json").write_text(json.dumps({"preset": args.preset, "dtypes": args.dtype}) + "\n")


def load_cuda_runtime() -> None:
    """TVM's runtime-only install needs its CUDA plugin (and the CUDA runtime it links) loaded by hand."""
    import tvm

    libs = sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so.1*")
                  + glob.glob(sys.prefix + "/lib/python3*/site-packages/nvidia/**/libcudart.so.1*", recursive=True))
    if libs:
        ctypes.CDLL(libs[0], mode=ctypes.RTLD_GLOBAL)
    plugin = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if os.path.exists(plugin):
        ctypes.CDLL(plugin, mode=ctypes.RTLD_GLOBAL)


class StateDictSource:
    """`convert_weight.stream_library_tensors` source over an in-memory state dict (HF names)."""

    def __init__(self, sd: dict, tied: bool):
        self.sd, self.tied = sd, tied

    def get(self, name):
        if name == "lm_head.weight" and self.tied:
            return self.sd["model.embed_tokens.weight"]
        return self.sd[name]


def write_weights(folder: Path, model, quantization: str) -> None:
    from blockffn.artifacts.reader import library_manifest
    from blockffn.artifacts.weights import write_tensor_cache
    from blockffn.compiler.convert_weight import stream_library_tensors

    for f in list(folder.glob("params_shard_*.bin")):
        f.unlink()
    params = library_manifest(folder / "lib.so")["params"]
    source = StateDictSource(model.state_dict(), model.config.tie_word_embeddings)
    write_tensor_cache(stream_library_tensors(source, params, model.config, quantization), folder)


def bytes_per_token(cfg, fraction: float, quantization: str) -> float:
    """Weight bytes one decode step reads (see the module docstring)."""
    from blockffn.runtime.roofline import step_weight_bytes

    return step_weight_bytes(cfg, fraction, quantization)


def copy_bandwidth() -> float:
    import torch

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    del x, y
    return 2 * (1 << 30) / ((time.perf_counter() - t0) / 20)


def decode_ms(engine, tokens: int, runs: int) -> tuple[float, list[int]]:
    """Median ms per decode step through the runtime's Generator (the loop `blockffn generate` runs)."""
    from blockffn.runtime.generation import Generator
    from blockffn.runtime.sampling import GenerationParams

    gen = Generator(engine)
    gen.generate(PROMPT, GenerationParams(max_tokens=16, greedy=True, stop_at_eos=False), text=False)  # capture
    times, first = [], None
    for _ in range(runs):
        r = gen.generate(PROMPT, GenerationParams(max_tokens=tokens, greedy=True, stop_at_eos=False), text=False)
        times.append(1000 * r.decode_s / (len(r.tokens) - 1))
        first = list(r.tokens[:16])
    return float(np.median(times)), first


def verify_cost(engine, ks=(1, 4, 8, 16), reps=20) -> dict:
    """Median time of one batch_verify of a k-token chain over one decode step, same sequence state."""
    engine.add_sequence(0)
    tok = int(np.argmax(engine.prefill(0, PROMPT)))
    dec = []
    for _ in range(reps + 5):
        t0 = time.perf_counter()
        tok = int(np.argmax(engine.decode(0, tok)))
        dec.append(time.perf_counter() - t0)
    base = float(np.median(dec[5:]))
    out = {"decode_ms": 1000 * base}
    for k in ks:
        ts = []
        for _ in range(reps + 5):
            t0 = time.perf_counter()
            engine.batch_verify(0, [(tok + j) % engine.cfg.vocab_size for j in range(k)], list(range(-1, k - 1)))
            ts.append(time.perf_counter() - t0)
            engine.commit_tree(0, -1)
        out[f"verify{k}_over_decode"] = float(np.median(ts[5:])) / base
    engine.remove_sequence(0)
    return out


def prebuilt(args) -> None:
    import torch

    from blockffn.model import BlockFFNForCausalLM, preset_config
    from blockffn.model.forced_routing import force_active
    from blockffn.runtime.engine import Engine

    load_cuda_runtime()
    root = Path(args.prebuilt)
    meta = json.loads((root / "bench.json").read_text())
    cfg = preset_config(meta["preset"])
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write) {bw / 1e12:.3f} TB/s")
    rows = []
    for fraction in args.fractions:
        model = BlockFFNForCausalLM(cfg).init_weights(0)
        force_active(model, fraction)
        with torch.no_grad():
            reference = model(torch.tensor([PROMPT])).logits[0, -1].numpy()
        for folder in sorted(p for p in root.iterdir() if (p / "lib.so").exists()
                             and (not args.builds or p.name in args.builds)):
            quantization = folder.name.rsplit("-", 1)[0]
            write_weights(folder, model, quantization)
            row = {"build": folder.name, "fraction": fraction,
                   "bytes_per_token": {"dense": bytes_per_token(cfg, 1.0, quantization),
                                       "sparse": bytes_per_token(cfg, fraction, quantization)}}
            for ffn in ("dense", "sparse"):
                engine = Engine(folder, device="cuda", ffn=ffn, verify_md5=False, model_lib=folder / "lib.so")
                engine.add_sequence(0)
                logits = engine.prefill(0, PROMPT)
                engine.remove_sequence(0)
                ms, first = decode_ms(engine, args.tokens, args.runs)
                row[ffn] = {"ms_per_token": ms, "tok_s": 1000 / ms, "first_tokens": first,
                            "bandwidth_fraction": row["bytes_per_token"][ffn] / (ms / 1000) / bw,
                            "prefill_max_rel_err_vs_torch_fp32": float(np.abs(logits - reference).max()
                                                                       / np.abs(reference).max())}
                if not args.no_verify:
                    row[ffn]["verify"] = verify_cost(engine)
                del engine
                gc.collect()
            row["sparse_over_dense"] = row["dense"]["ms_per_token"] / row["sparse"]["ms_per_token"]
            row["same_greedy_tokens"] = row["dense"]["first_tokens"] == row["sparse"]["first_tokens"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        gc.collect()
    print(f"\n{'build':<16} {'F':>6} {'dense tok/s':>12} {'sparse tok/s':>13} {'sp/dn':>6} {'BW dense':>9} "
          f"{'BW sparse':>10} {'verify8/dec':>12}")
    for r in rows:
        v8 = r["sparse"].get("verify", {}).get("verify8_over_decode", float("nan"))
        print(f"{r['build']:<16} {r['fraction']:>6.3f} {r['dense']['tok_s']:>12.1f} {r['sparse']['tok_s']:>13.1f} "
              f"{r['sparse_over_dense']:>6.2f} {r['dense']['bandwidth_fraction']:>9.2f} "
              f"{r['sparse']['bandwidth_fraction']:>10.2f} {v8:>12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"copy_bandwidth_Bps": bw, "preset": meta["preset"], "rows": rows},
                                              indent=1) + "\n")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the compile's phase lines
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--prebuilt", default=None, help="folder written by --build-only (on the GPU machine)")
    ap.add_argument("--preset", default="3b")
    ap.add_argument("--dtype", action="append", default=None, help="q0f16, q4f16_1 (repeatable; default q0f16)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--cuda-graph", choices=("both", "on", "off"), default="both",
                    help="--build-only: libraries with CUDA graphs, without, or both")
    ap.add_argument("--context-window", type=int, default=1024)
    ap.add_argument("-o", "--output", default="bench-gpu")
    ap.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.125, 0.25, 0.5])
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--builds", type=lambda s: s.split(","), default=None,
                    help="--prebuilt: only these build folders (e.g. q0f16-graph)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.dtype = args.dtype or ["q0f16"]
    if args.prebuilt:
        prebuilt(args)
    else:
        build(args)
        if not args.build_only:
            args.prebuilt = args.output
            prebuilt(args)


if __name__ == "__main__":
    main()
