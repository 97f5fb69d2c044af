"""Decode speed and weight bytes of q4 artifacts against their unquantized twins, dense and sparse FFN, on CPU.

    python benchmarks/quant_decode.py [--dtypes q0f16,q4f16_1,q0f32,q4f32_1] [--tokens 64] [--small] [--json OUT]

For every dtype × FFN lowering (``--ffn dense`` / ``--ffn sparse``) it compiles the bundled model (or, with
``--small``, the official Small shape with 4 layers and random weights) for this CPU, greedy-decodes ``--tokens``
tokens after a warm-up and prints tok/s, the weight bytes of the tensor cache and the q4 / unquantized ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from blockffn import default_model_path
from blockffn.compiler.compile import CompileOptions, compile_model
from blockffn.model import BlockFFNForCausalLM, preset_config, save_model
from blockffn.runtime.engine import Engine
from blockffn.runtime.generation import Generator
from blockffn.runtime.sampling import GenerationParams

PROMPT_IDS = [5, 17, 99, 240, 13, 7, 1024, 33]


def decode_tok_s(artifact: Path, n_tokens: int) -> float:
    gen = Generator(Engine(artifact))
    gen.generate(PROMPT_IDS, GenerationParams(max_tokens=4, greedy=True, stop_at_eos=False))  # warm-up
    r = gen.generate(PROMPT_IDS, GenerationParams(max_tokens=n_tokens, greedy=True, stop_at_eos=False))
    return (len(r.tokens) - 1) / r.decode_s  # decode steps only


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="q0f16,q4f16_1,q0f32,q4f32_1")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--small", action="store_true", help="official Small shape, 4 layers, random weights")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = default_model_path()
        if args.small:
            model_dir = tmp / "small-model"
            cfg = preset_config("small", num_hidden_layers=4, vocab_size=4096)
            save_model(BlockFFNForCausalLM(cfg).init_weights(0), model_dir, dtype="float32")
        for dtype in args.dtypes.split(","):
            for ffn in ("dense", "sparse"):
                out = tmp / f"{dtype}-{ffn}"
                report = compile_model(CompileOptions(model_dir=model_dir, output=out, quantization=dtype, ffn=ffn,
                                                      context_window=256, prefill_chunk=64, max_batch_size=1))
                row = {"dtype": dtype, "ffn": ffn, "param_bytes": report["param_bytes"],
                       "tok_s": decode_tok_s(out, args.tokens)}
                rows.append(row)
                print(f"{dtype:<8} {ffn:<6} {row['tok_s']:8.1f} tok/s  weights {row['param_bytes'] / 2**20:7.2f} MiB",
                      flush=True)
    by = {(r["dtype"], r["ffn"]): r for r in rows}
    for q4, base in (("q4f16_1", "q0f16"), ("q4f32_1", "q0f32")):
        for ffn in ("dense", "sparse"):
            if (q4, ffn) in by and (base, ffn) in by:
                a, b = by[(q4, ffn)], by[(base, ffn)]
                print(f"{q4} / {base} {ffn:<6}: speed {a['tok_s'] / b['tok_s']:.2f}x, "
                      f"bytes {a['param_bytes'] / b['param_bytes']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "small": args.small, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
