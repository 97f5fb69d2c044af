"""Compile time and decode speed of the CPU artifact vs PyTorch eager, measured in one run.

    python benchmarks/bench_compile_and_decode.py [--small] [--tokens 128] [--json OUT]

Prints: compile seconds per phase for the bundled model (and, with --small, for the official Small shape with 16
layers and random weights), then greedy decode tok/s of the q0f32 artifact and of the PyTorch model on the same
prompt, and their ratio.  Both use all cores of this machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from blockffn import default_model_path
from blockffn.compiler.compile import CompileOptions, compile_model
from blockffn.data.prepare import load_tokenizer
from blockffn.model import BlockFFNForCausalLM, load_model, preset_config, save_model
from blockffn.model.generate import SamplingParams, generate
from blockffn.runtime.engine import Engine
from blockffn.runtime.generation import Generator
from blockffn.runtime.sampling import GenerationParams

PROMPT = "The President of the United States said that the"


def timed_compile(model_dir: Path, out: Path, **kw) -> dict:
    t0 = time.perf_counter()
    report = compile_model(CompileOptions(model_dir=model_dir, output=out, overwrite=True, **kw))
    report["total_s"] = time.perf_counter() - t0
    return report


def decode_speed(artifact: Path, model_dir: Path, n_tokens: int) -> dict:
    tok = load_tokenizer(model_dir)
    ids = tok.encode(PROMPT).ids
    params = SamplingParams(max_tokens=n_tokens, greedy=True, stop_at_eos=False)
    gen = Generator(Engine(artifact))
    gen.generate(ids, GenerationParams(max_tokens=8, greedy=True))  # warm-up
    r = gen.generate(ids, GenerationParams(max_tokens=n_tokens, greedy=True, stop_at_eos=False))
    tvm_r = {"tokens": list(r.tokens), "tok_per_s": r.tok_per_s}
    model = load_model(model_dir)
    generate(model, ids, SamplingParams(max_tokens=8, greedy=True))
    torch_r = generate(model, ids, params)
    return {"tokens": n_tokens, "tvm_tok_s": tvm_r["tok_per_s"], "torch_tok_s": torch_r["tok_per_s"],
            "ratio_tvm_over_torch": tvm_r["tok_per_s"] / torch_r["tok_per_s"],
            "same_tokens": tvm_r["tokens"] == torch_r["tokens"], "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="also compile the official Small shape (16 layers)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r = timed_compile(default_model_path(), tmp / "bundled")
        results["compile_bundled"] = {"seconds": r["seconds"], "total_s": r["total_s"]}
        print(f"compile bundled model: {r['total_s']:.1f} s  {r['seconds']}")
        results["decode"] = decode_speed(tmp / "bundled", default_model_path(), args.tokens)
        d = results["decode"]
        print(f"decode {d['tokens']} tokens: artifact {d['tvm_tok_s']:.1f} tok/s, PyTorch eager {d['torch_tok_s']:.1f} "
              f"tok/s -> {d['ratio_tvm_over_torch']:.2f}x (identical tokens: {d['same_tokens']})")
        if args.small:
            cfg = preset_config("small")
            save_model(BlockFFNForCausalLM(cfg).init_weights(0), tmp / "small-model", dtype="bfloat16")
            r = timed_compile(tmp / "small-model", tmp / "small", context_window=2048)
            results["compile_small"] = {"seconds": r["seconds"], "total_s": r["total_s"]}
            print(f"compile Small preset (16 layers, random): {r['total_s']:.1f} s  {r['seconds']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
