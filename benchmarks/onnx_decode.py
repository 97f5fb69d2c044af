"""ONNX Runtime as a peer: greedy decode of the same model by ONNX Runtime (CPU) and by our CPU artifact, dense-AR
and sparse-AR, on this machine, in one run.

    python benchmarks/onnx_decode.py [--preset small] [--force-active 0.25] [--tokens 64] [--threads 2] [--json OUT]

Without ``--preset`` it runs the bundled model; with it, a random-weight model of that official shape (``small``:
16 layers, d 768, 48 experts × 64, vocabulary 122,753), optionally with routing forced to a fraction of the
experts (`blockffn init --force-active`) so that sparse decoding has a known activation.  ONNX Runtime runs the
exported graph (`blockffn export-onnx --with-past`: dense FFN, KV cache in and out, fp32) with its plain decode
loop; ours runs the q0f32 artifact (`blockffn-compile --target cpu`) through the runtime's `Generator`, the path
`blockffn generate` takes.  Decode tok/s counts decode steps only (the token sampled from the prefill is not one)
for every engine; both use ``--threads`` threads.  Greedy tokens are compared between the engines.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def prepare_model(args, tmp: Path) -> Path:
    from blockffn import default_model_path

    if args.preset is None:
        return default_model_path()
    from blockffn.model import BlockFFNForCausalLM, preset_config, save_model
    from blockffn.model.forced_routing import force_active

    model = BlockFFNForCausalLM(preset_config(args.preset)).init_weights(0)
    if args.force_active is not None:
        force_active(model, args.force_active)
    out = tmp / f"{args.preset}-model"
    save_model(model, out, dtype="float32", tokenizer_dir=default_model_path())
    return out


def onnx_runtime_decode(model_dir: Path, tmp: Path, prompt: list[int], tokens: int, threads: int) -> dict:
    from blockffn.model import load_model
    from blockffn.model.onnx_export import export_onnx
    from blockffn.runtime.onnx_runner import OnnxRuntimeLM

    t0 = time.perf_counter()
    path = export_onnx(load_model(model_dir, dtype="float32"), tmp / "model.onnx", with_past=True)
    export_s = time.perf_counter() - t0
    ort = OnnxRuntimeLM(path, threads=threads)
    ort.greedy(prompt, 4)  # warm-up
    r = ort.greedy(prompt, tokens)
    return {"export_s": export_s, "decode_tok_s": r.decode_tok_s, "prefill_s": r.prefill_s, "tokens": r.tokens}


def ours_decode(model_dir: Path, tmp: Path, prompt: list[int], tokens: int) -> dict:
    from blockffn.compiler.compile import CompileOptions, compile_model
    from blockffn.runtime.engine import Engine
    from blockffn.runtime.generation import Generator
    from blockffn.runtime.sampling import GenerationParams

    art = tmp / "artifact"
    t0 = time.perf_counter()
    compile_model(CompileOptions(model_dir=model_dir, output=art, context_window=max(256, 2 * (len(prompt) + tokens)),
                                 draft="none"))
    rows = {"compile_s": time.perf_counter() - t0}
    params = GenerationParams(max_tokens=tokens, greedy=True, stop_at_eos=False)
    for mode, ffn in (("dense-AR", "dense"), ("sparse-AR", "auto")):
        gen = Generator(Engine(art, ffn=ffn))
        gen.generate(prompt, GenerationParams(max_tokens=4, greedy=True, stop_at_eos=False))  # warm-up
        r = gen.generate(prompt, params)
        rows[mode] = {"decode_tok_s": (len(r.tokens) - 1) / r.decode_s, "tokens": list(r.tokens)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="official shape with random weights (default: the bundled model)")
    ap.add_argument("--force-active", type=float, default=None, help="route exactly this fraction of the experts")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    from blockffn.data.prepare import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = prepare_model(args, tmp)
        prompt = load_tokenizer(model_dir).encode("The President of the United States said that the").ids
        ort = onnx_runtime_decode(model_dir, tmp, prompt, args.tokens, args.threads)
        ours = ours_decode(model_dir, tmp, prompt, args.tokens)
    base = ort["decode_tok_s"]
    result = {"model": args.preset or "bundled", "force_active": args.force_active, "threads": args.threads,
              "tokens": args.tokens, "onnxruntime": ort, **ours,
              "ratio_vs_onnxruntime": {m: ours[m]["decode_tok_s"] / base for m in ("dense-AR", "sparse-AR")},
              "same_tokens_as_onnxruntime": {m: ours[m]["tokens"] == ort["tokens"] for m in ("dense-AR", "sparse-AR")}}
    print(f"{result['model']} (force_active={args.force_active}), {args.threads} threads, {args.tokens} tokens")
    print(f"  onnxruntime  {base:8.1f} tok/s   (export {ort['export_s']:.0f} s)")
    for m in ("dense-AR", "sparse-AR"):
        print(f"  ours {m:<9} {ours[m]['decode_tok_s']:6.1f} tok/s   {result['ratio_vs_onnxruntime'][m]:.2f}x "
              f"onnxruntime   same greedy tokens: {result['same_tokens_as_onnxruntime'][m]}")
    print(f"  ours sparse-AR / dense-AR: {ours['sparse-AR']['decode_tok_s'] / ours['dense-AR']['decode_tok_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
