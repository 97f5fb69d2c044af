"""Run CUDA artifacts on a GPU machine: logits against a PyTorch reference, greedy parity, decode speed.

    python benchmarks/gpu_check.py REF.npz SPARSE_ARTIFACT [DENSE_ARTIFACT] [--json OUT]

REF.npz (made by ``--make-ref MODEL_DIR REF.npz [--quantization q4f16_1]`` on any machine with torch; with
``--quantization`` the reference model holds the q4 artifact's exact weights, fake-quantized) holds a prompt, the PyTorch fp32
logits of its last token, 32 greedy tokens and the logits of each decode step.  On a machine that has only TVM's
runtime (``TVM_USE_RUNTIME_LIB=1``), the CUDA runtime plugin is loaded by hand first.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import sys
import time

import numpy as np


def load_cuda_runtime() -> None:
    import tvm

    if os.environ.get("TVM_USE_RUNTIME_LIB") != "1":
        return
    cands = sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so.13*")
                   + glob.glob(sys.prefix + "/lib/python3*/site-packages/nvidia/**/libcudart.so.13*",
                               recursive=True))
    if cands:
        ctypes.CDLL(cands[0], mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so"),
                mode=ctypes.RTLD_GLOBAL)


def make_ref(model_dir: str, out: str, n_decode: int = 32, quantization: str | None = None) -> None:
    import torch

    from blockffn.model import load_model

    model = load_model(model_dir)
    if quantization:
        from blockffn.compiler.quantization import SCHEMES, fake_quantize_model

        fake_quantize_model(model, SCHEMES[quantization])
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, model.config.vocab_size, 48)]
    ids = list(prompt)
    logits = []
    with torch.no_grad():
        for _ in range(n_decode + 1):
            lg = model(torch.tensor([ids])).logits[0, -1].numpy()
            logits.append(lg)
            ids.append(int(np.argmax(lg)))
    np.savez(out, prompt=np.array(prompt), tokens=np.array(ids[len(prompt):]), logits=np.stack(logits))


def check(ref_path: str, artifact: str, label: str) -> dict:
    from blockffn.runtime.engine import Engine
    from blockffn.runtime.generation import Generator
    from blockffn.runtime.sampling import GenerationParams

    ref = np.load(ref_path)
    prompt, tokens, ref_logits = list(ref["prompt"]), list(ref["tokens"]), ref["logits"]
    engine = Engine(artifact, device="cuda")
    engine.add_sequence(0)
    errs = [float(np.abs(engine.prefill(0, prompt) - ref_logits[0]).max() / np.abs(ref_logits[0]).max())]
    for i, tok in enumerate(tokens[:-1]):
        lg = engine.decode(0, tok)
        errs.append(float(np.abs(lg - ref_logits[i + 1]).max() / np.abs(ref_logits[i + 1]).max()))
    engine.remove_sequence(0)
    generator = Generator(engine)
    params = GenerationParams(max_tokens=len(tokens), greedy=True, stop_at_eos=False)
    gen = generator.generate(prompt, params, text=False)
    n = 256
    generator.generate(prompt, GenerationParams(max_tokens=16, greedy=True, stop_at_eos=False), text=False)
    timed = generator.generate(prompt, GenerationParams(max_tokens=n, greedy=True, stop_at_eos=False), text=False)
    return {"artifact": label, "ffn": engine.art.manifest.get("ffn"), "max_rel_err": max(errs),
            "greedy_matches_pytorch": list(gen.tokens) == tokens,
            "decode_tok_s": (len(timed.tokens) - 1) / timed.decode_s, "prefill_tok_s": timed.prefill_tok_per_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--make-ref", metavar="MODEL_DIR")
    ap.add_argument("--quantization", choices=["q4f16_1", "q4f32_1"], help="--make-ref with fake-quantized weights")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.make_ref:
        make_ref(args.make_ref, args.ref, quantization=args.quantization)
        return
    load_cuda_runtime()
    results = [check(args.ref, a, os.path.basename(a.rstrip("/"))) for a in args.artifacts]
    for r in results:
        print(json.dumps(r))
    if len(results) == 2:
        print(f"decode sparse/dense speed ratio: {results[0]['decode_tok_s'] / results[1]['decode_tok_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"[{time.time() - t0:.1f}s]")
