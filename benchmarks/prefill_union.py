"""Chunked-union prefill vs dense prefill on the bundled model (or --model), per --union-chunk, per prompt length.

    python benchmarks/prefill_union.py [--model DIR] [--chunks 8 16 32] [--lengths 32 128 512] [--json OUT.json]

Compiles the model for the local CPU once per union chunk (no draft), then times whole-prompt prefill on held-out
English text through each artifact's `prefill` (a union of active experts per chunk) and its dense twin
`prefill_dense` (every expert), best of 3, in this run.  Prints ms and the ratio sparse/dense; what the runtime's
measured prefill choice (`blockffn.runtime.prefill_choice`) would pick follows from the same numbers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from blockffn import default_model_path
from blockffn.compiler.compile import CompileOptions, compile_model
from blockffn.runtime.engine import Engine
from blockffn.runtime.measurements import best_time
from blockffn.runtime.prefill_choice import calibration_tokens


def prefill_ms(engine: Engine, func: str, tokens: list[int]) -> float:
    def run():
        engine.add_sequence(0)
        try:
            for i in range(0, len(tokens), engine.prefill_chunk):
                chunk = tokens[i: i + engine.prefill_chunk]
                emb = engine._reshaped_embeds(chunk, (1, len(chunk), engine.cfg.hidden_size))
                engine._forward(func, [0], [len(chunk)], [emb])
        finally:
            engine.remove_sequence(0)

    return best_time(run, repeat=3) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = args.model or default_model_path()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in args.chunks:
            out = Path(tmp) / f"c{chunk}"
            compile_model(CompileOptions(model_dir=model, target="cpu", output=out, draft="none", union_chunk=chunk))
            engine = Engine(out, ffn="sparse")
            for n in args.lengths:
                tokens = calibration_tokens(engine, min(n, engine.context_window))
                sparse, dense = prefill_ms(engine, "prefill", tokens), prefill_ms(engine, "prefill_dense", tokens)
                rows.append({"union_chunk": chunk, "tokens": len(tokens), "sparse_ms": sparse, "dense_ms": dense})
                print(f"union chunk {chunk:>3}  prompt {len(tokens):>4} tokens  chunked-union {sparse:8.2f} ms  "
                      f"dense {dense:8.2f} ms  ratio {sparse / dense:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
