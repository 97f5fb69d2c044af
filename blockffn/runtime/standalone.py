"""Greedy prefill + decode of an artifact folder with only numpy and the TVM runtime.

For machines where blockffn and PyTorch are not installed: an aarch64 board, or qemu-aarch64 with the aarch64
apache-tvm wheel (tests/test_qemu_aarch64.py).  It therefore imports nothing from blockffn and runs as a script:

    TVM_USE_RUNTIME_LIB=1 python standalone.py ARTIFACT --tokens 12,7,99 --steps 4 --out result.npz

``result.npz`` holds ``prefill_logits`` [V] (last prompt token), ``decode_logits`` [steps, V] and the greedy
``tokens`` [steps + 1]; one JSON line of timings goes to stdout.  `blockffn.runtime.engine.Engine` is the full
runtime (batches, tree verify, sampling); this is the smallest faithful driver of the same library calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def run(artifact: str | Path, prompt: list[int], steps: int) -> dict:
    """Prefill ``prompt`` into one sequence, then ``steps`` greedy decode steps; returns logits, tokens, timings."""
    import numpy as np
    import tvm
    from tvm.runtime import ShapeTuple as S
    from tvm.runtime.vm import VirtualMachine

    folder = Path(artifact)
    manifest = json.loads((folder / "blockffn-manifest.json").read_text())
    hidden = json.loads((folder / "mlc-chat-config.json").read_text())["model_config"]["hidden_size"]
    if len(prompt) + steps > manifest["context_window_size"]:
        raise SystemExit(f"prompt + steps exceed the artifact's context window {manifest['context_window_size']}")
    dev = tvm.cpu()
    t0 = time.perf_counter()
    vm = VirtualMachine(tvm.runtime.load_module(str(folder / manifest["library"])), dev)
    tvm.get_global_func("vm.builtin.tensor_cache.load")(str(folder), int(dev.dlpack_device_type()), 0)
    params = tvm.get_global_func("vm.builtin.param_array_from_cache_by_name")([p["name"] for p in manifest["params"]])
    chunk = manifest["prefill_chunk_size"]
    kv = vm["create_tir_paged_kv_cache"](S([1]), S([manifest["context_window_size"]]), S([chunk]), S([16]), S([0]))
    builtin = {n: tvm.get_global_func(f"vm.builtin.kv_state_{n}") for n in ("add_sequence", "begin_forward",
                                                                            "end_forward")}
    builtin["add_sequence"](kv, 0)
    load_s = time.perf_counter() - t0

    def step(func: str, ids: list[int]):
        emb = vm["embed"](tvm.runtime.tensor(np.asarray(ids, dtype="int32"), dev), params).numpy()
        builtin["begin_forward"](kv, S([0]), S([len(ids)]))
        out = vm[func](tvm.runtime.tensor(emb.reshape(1, len(ids), hidden), dev), kv, params)
        builtin["end_forward"](kv)
        return out[0].numpy()[0, -1].astype("float32")

    t0 = time.perf_counter()
    for i in range(0, len(prompt), chunk):
        prefill_logits = step("prefill", prompt[i: i + chunk])
    prefill_s = time.perf_counter() - t0
    tokens = [int(np.argmax(prefill_logits))]
    decode_logits, decode_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        decode_logits.append(step("decode", tokens[-1:]))
        decode_s.append(time.perf_counter() - t0)
        tokens.append(int(np.argmax(decode_logits[-1])))
    return {"prefill_logits": prefill_logits, "decode_logits": np.stack(decode_logits) if steps else
            np.zeros((0, prefill_logits.size), "float32"), "tokens": np.asarray(tokens, dtype="int64"),
            "timings": {"load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s}}


def main(argv=None) -> None:
    t_start = time.perf_counter()
    # run as a script, this folder heads sys.path and its inspect.py would shadow the standard library's
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--tokens", required=True, help="prompt token ids, comma-separated")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True, help="result .npz")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # runtime library only: no compiler needed or loaded
    import numpy as np
    import platform

    import tvm  # noqa: F401  (timed: most of the start-up under qemu)

    import_s = time.perf_counter() - t_start
    r = run(args.artifact, [int(t) for t in args.tokens.split(",")], args.steps)
    np.savez(args.out, prefill_logits=r["prefill_logits"], decode_logits=r["decode_logits"], tokens=r["tokens"])
    print(json.dumps({"machine": platform.machine(), "import_s": import_s, **r["timings"]}))


if __name__ == "__main__":
    sys.exit(main())
