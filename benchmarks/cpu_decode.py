"""CPU decode against memory bandwidth at official shapes: every dtype, dense and sparse at forced activations, 1 and
2 threads, in one run.

    python benchmarks/cpu_decode.py [--preset small] [--layers N] [--dtypes q0f32,q0f16,q4f32_1,q4f16_1]
                                    [--fractions 0.25,0.5] [--threads 1,2] [--tokens 32] [--json OUT]

For each activation fraction F a random model of the preset is made with routing forced to F of the experts
(`blockffn init --force-active F`), compiled for this CPU per dtype (`--ffn auto`: the sparse functions and their
dense twins in one library), and greedy-decoded through the runtime's `Generator` (dense-AR: the dense twins;
sparse-AR: the sparse functions) in a fresh process per thread count (TVM's thread pool is sized once per process).

Reported per row: decode tok/s (decode steps only), the weight bytes a step reads (`blockffn.runtime.roofline`:
one embedding row, the LM head, every layer with the active share of its experts), achieved GB/s and the fraction
of the copy bandwidth measured in the same process with the same number of threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = [5, 17, 99, 240, 13, 7, 1024, 33]


def child(art: Path, tokens: int, threads: int) -> dict:
    """Runs in a process whose TVM_NUM_THREADS is ``threads``: decode speed of both FFN modes and the bandwidth."""
    from blockffn.runtime.engine import Engine
    from blockffn.runtime.generation import Generator
    from blockffn.runtime.roofline import cpu_bandwidth
    from blockffn.runtime.sampling import GenerationParams

    out = {"bandwidth": cpu_bandwidth(threads)}
    for mode, ffn in (("dense", "dense"), ("sparse", "sparse")):
        gen = Generator(Engine(art, ffn=ffn))
        gen.generate(PROMPT, GenerationParams(max_tokens=4, greedy=True, stop_at_eos=False))  # warm-up
        r = gen.generate(PROMPT, GenerationParams(max_tokens=tokens, greedy=True, stop_at_eos=False))
        out[mode] = (len(r.tokens) - 1) / r.decode_s
        out[mode + "_tokens"] = list(r.tokens)
    return out


def measure(art: Path, tokens: int, threads: int) -> dict:
    env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, __file__, "--child", str(art), "--tokens", str(tokens)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"decode of {art} with {threads} threads failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (quick runs; the LM head share grows)")
    ap.add_argument("--dtypes", default="q0f32,q0f16,q4f32_1,q4f16_1")
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, int(os.environ["TVM_NUM_THREADS"]))))
        return
    from blockffn import default_model_path
    from blockffn.compiler.compile import CompileOptions, compile_model
    from blockffn.model import BlockFFNForCausalLM, preset_config, save_model
    from blockffn.model.forced_routing import force_active
    from blockffn.runtime.roofline import step_weight_bytes

    cfg = preset_config(args.preset, num_hidden_layers=args.layers)
    rows = []
    print(f"{args.preset} ({cfg.num_hidden_layers} layers, vocabulary {cfg.vocab_size}), {args.tokens} tokens")
    print(f"{'dtype':<8} {'F':>5} {'thr':>3} {'mode':<6} {'tok/s':>7} {'GB/step':>8} {'GB/s':>6} {'BW GB/s':>8} "
          f"{'fraction':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            model = BlockFFNForCausalLM(cfg).init_weights(0)
            force_active(model, fraction)
            model_dir = tmp / f"model-{fraction}"
            save_model(model, model_dir, dtype="float32", tokenizer_dir=default_model_path())
            del model
            for dtype in args.dtypes.split(","):
                art = tmp / f"{dtype}-{fraction}"
                compile_model(CompileOptions(model_dir=model_dir, output=art, quantization=dtype, ffn="auto",
                                             context_window=256, prefill_chunk=64, max_batch_size=1, draft="none"))
                for threads in [int(t) for t in args.threads.split(",")]:
                    m = measure(art, args.tokens, threads)
                    for mode, active in (("dense", 1.0), ("sparse", fraction)):
                        step = step_weight_bytes(cfg, active, dtype)
                        row = {"dtype": dtype, "fraction": fraction, "threads": threads, "mode": mode,
                               "tok_s": m[mode], "step_bytes": step, "achieved_gbs": step * m[mode] / 1e9,
                               "bandwidth_gbs": m["bandwidth"] / 1e9,
                               "bandwidth_fraction": step * m[mode] / m["bandwidth"],
                               "same_tokens_as_dense": m[mode + "_tokens"] == m["dense_tokens"]}
                        rows.append(row)
                        print(f"{dtype:<8} {fraction:>5} {threads:>3} {mode:<6} {row['tok_s']:7.1f} "
                              f"{step / 1e9:8.3f} {row['achieved_gbs']:6.1f} {row['bandwidth_gbs']:8.1f} "
                              f"{row['bandwidth_fraction']:8.2f}", flush=True)
    by = {(r["dtype"], r["fraction"], r["threads"], r["mode"]): r["tok_s"] for r in rows}
    for (dtype, fraction, threads, mode), tok_s in sorted(by.items()):
        base = by.get(("q0f32", fraction, threads, mode))
        if mode == "dense" and base and dtype != "q0f32":
            print(f"{dtype} / q0f32 dense, F={fraction}, {threads} thr: {tok_s / base:.2f}x")
        if mode == "sparse":
            print(f"{dtype} sparse / dense, F={fraction}, {threads} thr: "
                  f"{tok_s / by[(dtype, fraction, threads, 'dense')]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "layers": cfg.num_hidden_layers, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
