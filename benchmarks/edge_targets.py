"""Compile the bundled model for every target preset, then run the cpu-aarch64 build under qemu-aarch64.

    python benchmarks/edge_targets.py [--presets cpu cpu-aarch64 ...] [--steps 8] [--json OUT.json]

Per preset: compile seconds by phase and library size (a preset whose toolchain is missing is listed with the
one-line reason).  Then, when qemu and the arm64 sysroot are present (tools/build_qemu_sysroot.sh), greedy
prefill + decode of the cpu-aarch64 library under qemu (blockffn/runtime/standalone.py) against the x86 cpu
library with the same weights: start-up, prefill and per-token decode times and the max relative logit error.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import blockffn.runtime.standalone as standalone
from blockffn import default_model_path
from blockffn.compiler.compile import CompileOptions, compile_model
from blockffn.data.prepare import load_tokenizer
from blockffn.errors import BlockFFNError
from blockffn.targets import TARGETS, qemu

PROMPT = "The President said that the new law would be signed next week"


def compile_presets(presets: list[str], out: Path) -> list[dict]:
    rows = []
    for name in presets:
        t0 = time.perf_counter()
        try:
            r = compile_model(CompileOptions(model_dir=default_model_path(), target=name, output=out / name))
        except BlockFFNError as e:
            rows.append({"preset": name, "skipped": str(e)})
            print(f"{name:<15} skipped: {e}")
            continue
        wall = time.perf_counter() - t0
        size = (out / name / r["library"]).stat().st_size
        rows.append({"preset": name, "wall_s": wall, "phases_s": r["seconds"], "library_bytes": size})
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items())
        print(f"{name:<15} {wall:6.1f} s  ({phases})  {r['library']} {size / 2**20:.2f} MiB")
    return rows


def run_under_qemu(x86: Path, arm: Path, steps: int) -> dict:
    prompt = load_tokenizer(x86).encode(PROMPT).ids
    ref = standalone.run(x86, prompt, steps)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        p = qemu.run_python(standalone.__file__, [str(arm), "--tokens", ",".join(map(str, prompt)), "--steps",
                                                  str(steps), "--out", f"{tmp}/r.npz"])
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"qemu run failed:\n{p.stderr[-2000:]}")
        got = np.load(f"{tmp}/r.npz")
        timings = json.loads(p.stdout.strip().splitlines()[-1])

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    return {"prompt_tokens": len(prompt), "wall_s": wall, **timings,
            "prefill_max_rel_err": rel(got["prefill_logits"], ref["prefill_logits"]),
            "decode_max_rel_err": rel(got["decode_logits"], ref["decode_logits"]),
            "greedy_tokens_equal": got["tokens"].tolist() == ref["tokens"].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=list(TARGETS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        result["compile"] = compile_presets(args.presets, out)
        built = {r["preset"] for r in result["compile"] if "skipped" not in r}
        reason = qemu.unavailable_reason() or (None if {"cpu", "cpu-aarch64"} <= built else
                                               "needs the cpu and cpu-aarch64 builds")
        if reason:
            print(f"qemu run skipped: {reason}")
        else:
            q = result["qemu"] = run_under_qemu(out / "cpu", out / "cpu-aarch64", args.steps)
            decode_ms = [1e3 * s for s in q["decode_s"]]
            print(f"qemu-aarch64: {q['prompt_tokens']}-token prompt + {args.steps} decode steps, wall {q['wall_s']:.1f} s: "
                  f"import {q['import_s']:.1f} s, load {q['load_s']:.2f} s, prefill {1e3 * q['prefill_s']:.0f} ms, "
                  f"decode first {decode_ms[0]:.0f} ms then median {np.median(decode_ms[1:] or decode_ms):.0f} ms/token; "
                  f"max rel err prefill {q['prefill_max_rel_err']:.1e} decode {q['decode_max_rel_err']:.1e}; "
                  f"greedy tokens equal: {q['greedy_tokens_equal']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
