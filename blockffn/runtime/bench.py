"""`blockffn bench`: decode and prefill speed of one artifact in every FFN x decoding mode, on the same weights.

Modes: ``dense-AR`` / ``sparse-AR`` (plain decoding with the dense twins / the sparse functions), ``dense-spec`` /
``sparse-spec`` (speculative decoding with the artifact's draft under the runtime's never-slower policy), and
``sparse-chain4`` / ``sparse-tree32`` (one speculation kind forced every round).  Also: a memory bandwidth figure measured on the same device, and the roofline
fraction of dense decoding (the weight bytes one step reads - `blockffn.runtime.roofline`, one embedding row, not
the table - times decode steps per second, over that bandwidth).
"""

from __future__ import annotations

import lzma
import time

import numpy as np

from blockffn.errors import BlockFFNError


def default_prompts(n: int = 8, words: int = 24) -> list[str]:
    """Openings of held-out documents bundled with the package (never seen in training)."""
    from blockffn import bundled_path

    text = lzma.open(bundled_path("heldout.txt.xz"), "rt", encoding="utf-8").read()
    docs = [d.strip() for d in text.split("\n\n") if len(d.split()) >= words]
    step = max(1, len(docs) // n)
    return [" ".join(d.split()[:words]) for d in docs[::step][:n]]


def measure_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Copy bandwidth (bytes read + written per second, best of 5) of the device's memory; on CPUs with as many
    threads as TVM's pool runs decode with."""
    if device == "cpu":
        import os

        from blockffn.runtime.roofline import cpu_bandwidth

        return cpu_bandwidth(int(os.environ.get("TVM_NUM_THREADS") or os.cpu_count() or 1), nbytes)
    import tvm

    dev = tvm.cuda()
    a = tvm.runtime.empty((nbytes // 4,), "float32", dev)
    b = tvm.runtime.empty((nbytes // 4,), "float32", dev)

    def copy():
        a.copyto(b)
        dev.sync()

    best = min(_timed(copy) for _ in range(5))
    return 2 * nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _run(gen, prompt_ids, params) -> dict:
    """Decode tok/s over decode steps only: a generation's first token comes from its prefill."""
    tokens = decode_s = prefill_s = n_prompt = 0
    accepted = []
    for ids in prompt_ids:
        r = gen.generate(ids, params)
        tokens += len(r.tokens) - 1
        decode_s += r.decode_s
        prefill_s += r.prefill_s
        n_prompt += len(ids)
        accepted += r.accepted
    return {"decode_tok_s": tokens / decode_s, "prefill_tok_s": n_prompt / prefill_s,
            "accept_len": float(np.mean(accepted)) if accepted else None, "tokens": tokens}


def run_bench(artifact, device: str = "cpu", draft=None, prompts=None, max_tokens: int = 64, log=print,
              model_lib=None) -> dict:
    from blockffn.runtime.engine import Engine
    from blockffn.runtime.generation import Generator, SpecConfig
    from blockffn.runtime.sampling import GenerationParams
    from blockffn.runtime.session import open_drafter, resolve_mode

    prompts = prompts or default_prompts()
    params = GenerationParams(max_tokens=max_tokens, greedy=True, stop_at_eos=False)
    sparse = Engine(artifact, device=device, ffn="auto", model_lib=model_lib)
    if not sparse.art.manifest.get("ffn", {}).get("sparse_functions"):
        raise BlockFFNError(f"{artifact} was compiled with --ffn dense; bench compares dense and sparse decoding, "
                            f"compile it with --ffn auto")
    dense = Engine(artifact, device=device, ffn="dense", model_lib=model_lib)
    prompt_ids = [sparse.tokenizer.encode(p).ids for p in prompts]
    room = sparse.context_window - max_tokens - 40
    prompt_ids = [ids[:room] for ids in prompt_ids if ids]
    drafter = open_drafter(draft, sparse, device)
    mode = resolve_mode("auto", drafter)
    runs = [("dense-AR", dense, None), ("sparse-AR", sparse, None)]
    if drafter is not None:
        # spec rows run the runtime's policy (chain / tree / plain per round, from measured costs); the forced rows
        # show each speculation kind on its own
        runs += [("dense-spec", dense, SpecConfig(mode=mode)), ("sparse-spec", sparse, SpecConfig(mode=mode)),
                 ("sparse-chain4", sparse, SpecConfig(mode="chain", chain_len=4, adaptive=False))]
        if drafter.kind == "eagle":
            runs.append(("sparse-tree32", sparse, SpecConfig(mode="tree", adaptive=False)))
    stats_build = any(f.endswith("_with_stats") for f in sparse.functions)
    sparse.collect_stats = stats_build
    modes = {}
    for name, engine, spec in runs:
        gen = Generator(engine) if spec is None else Generator(engine, drafter, spec)
        _run(gen, prompt_ids[:1], GenerationParams(max_tokens=8, greedy=True, stop_at_eos=False))  # warm-up
        engine.stats_log.clear()
        modes[name] = _run(gen, prompt_ids, params)
        m = modes[name]
        if stats_build and engine is sparse:
            m["observed"] = engine.observed_sparsity()
        log(f"  {name:<14} decode {m['decode_tok_s']:8.1f} tok/s   prefill {m['prefill_tok_s']:8.1f} tok/s"
            + (f"   accepted {m['accept_len']:.2f} tokens/verify" if m["accept_len"] else "")
            + "".join(f"   {k}: TLS {v['tls']:.3f}, union {v['mean_union']:.1f}"
                      for k, v in m.get("observed", {}).items() if k != "all"))
    from blockffn.runtime.roofline import step_weight_bytes

    bw = measure_bandwidth(device)
    step_bytes = step_weight_bytes(sparse.cfg, 1.0, sparse.art.manifest["quantization"])  # one embedding row
    achieved = step_bytes * modes["dense-AR"]["decode_tok_s"]
    base = modes["dense-AR"]["decode_tok_s"]
    return {"artifact": str(artifact), "device": device, "draft": None if drafter is None else drafter.kind,
            "speculative_mode": mode, "prompts": len(prompt_ids), "max_tokens": max_tokens, "modes": modes,
            "speedup_vs_dense_ar": {k: v["decode_tok_s"] / base for k, v in modes.items()},
            "bandwidth_gbs": bw / 1e9, "step_weight_bytes": step_bytes, "achieved_gbs": achieved / 1e9,
            "roofline_fraction": achieved / bw}


def plot(result: dict, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BlockFFNError("--plot needs matplotlib (pip install matplotlib)") from None
    names = list(result["modes"])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [result["modes"][n]["decode_tok_s"] for n in names])
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"{result['artifact']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path)
