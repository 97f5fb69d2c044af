"""Prefill: chunked-union sparse FFN or dense FFN, whichever this device runs faster.

A ``--ffn auto`` library carries both lowerings of the prefill functions: ``prefill`` (each chunk of
``--union-chunk`` tokens computes only the union of its experts) and its dense twin ``prefill_dense``.  Which is
faster depends on the device (a CPU saves in proportion to the skipped experts; a large GPU runs the dense GEMM
near peak and may gain nothing) and on the prompt length, so the runtime times both on real text at two lengths,
once per library and device, and picks per call by interpolating those costs.
"""

from __future__ import annotations

import numpy as np

from blockffn.errors import BlockFFNError
from blockffn.runtime.measurements import best_time, cached_measurement, interpolate_cost

PREFILL_FUNCTIONS = ("prefill", "batch_prefill", "prefill_to_last_hidden_states")
CALIBRATION_LENGTHS = (16, 128)


def calibration_tokens(engine, n: int) -> list[int]:
    """``n`` tokens of held-out English text (expert activity on real text, not on random ids); random ids for
    an artifact without a tokenizer."""
    from blockffn.runtime.bench import default_prompts

    try:
        ids = engine.tokenizer.encode(" ".join(default_prompts(n=8, words=200))).ids
    except BlockFFNError:
        ids = [int(t) for t in np.random.default_rng(0).integers(0, engine.cfg.vocab_size, n)]
    return (ids * (n // max(1, len(ids)) + 1))[:n]


def measure_prefill(engine) -> dict:
    """Seconds per prefill call of each lowering at the calibration lengths: {"sparse": {n: s}, "dense": {...}}
    (on a scratch sequence, removed after each call)."""
    seq_id = max(engine.state.lengths, default=0) + 1000
    lengths = sorted({min(n, engine.prefill_chunk, engine.context_window) for n in CALIBRATION_LENGTHS})
    out = {"sparse": {}, "dense": {}}
    for n in lengths:
        emb = engine._reshaped_embeds(calibration_tokens(engine, n), (1, n, engine.cfg.hidden_size))
        for kind, func in (("sparse", "prefill"), ("dense", "prefill_dense")):
            def run():
                engine.add_sequence(seq_id)
                try:
                    engine._forward(func, [seq_id], [n], [emb])
                finally:
                    engine.remove_sequence(seq_id)

            out[kind][str(n)] = best_time(run, repeat=3)
    return out


class PrefillChoice:
    """Per-call choice between the sparse prefill functions and their dense twins, from measured costs."""

    def __init__(self, costs: dict):
        self.costs = {k: {int(n): float(costs[k][n]) for n in costs["sparse"]} for k in ("sparse", "dense")}

    def dense(self, n: int) -> bool:
        """Whether an ``n``-token prefill call should run the dense twin."""
        return interpolate_cost(self.costs["dense"], n) < interpolate_cost(self.costs["sparse"], n)

    def summary(self) -> dict:
        return {n: {kind: round(self.costs[kind.removesuffix("_ms")][n] * 1e3, 3) for kind in ("sparse_ms", "dense_ms")}
                for n in sorted(self.costs["sparse"])}


def prefill_choice(engine) -> PrefillChoice | None:
    """The measured choice for an engine whose library has chunked-union prefill with dense twins (else None).
    Needs a free sequence slot for its scratch sequence (the caller checks)."""
    twins = (engine.art.manifest.get("ffn") or {}).get("dense_twins", {})
    if twins.get("prefill") not in engine.functions:
        return None
    return cached_measurement("prefill-choice", engine.art.library, [engine.device],
                              lambda: measure_prefill(engine), parse=PrefillChoice)
