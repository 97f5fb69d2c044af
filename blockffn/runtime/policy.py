"""When to speculate, and how much: never slower than plain decoding.

At start-up (cached per library, device and FFN mode) the runtime times a plain decode step, a verify call for
each candidate size and the draft's cost per round.  During generation it keeps a running estimate of how many
tokens a round yields; each round it picks the plan with the highest expected tokens per second:

* plain decoding: 1 token per ``t_decode``;
* a chain of k drafts: (1 - a^(k+1)) / (1 - a) tokens (per-token acceptance rate a) per
  ``t_draft(k) + t_verify(k + 1)``;
* an EAGLE-2 tree: the running mean accepted length per ``t_tree + t_verify(tree_size)``.

With an EAGLE draft and ``--speculative auto`` both chains and trees are candidates: on a CPU a 32-token verify
costs several decode steps, so short chains usually win there, while on a GPU the tree's verify is nearly free.

The model picks the speculative plan; whether to speculate at all is decided, once both have run, by their measured
wall-clock rates (tokens emitted / seconds, moving averages): those include the runtime's per-round work (host
bookkeeping, kernel launches) that timing library calls alone misses, which decides the outcome for small models on
GPUs.  When plain decoding wins, speculation is still probed, at most about 1/``probe_every`` of the time, so the
estimates can recover.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blockffn.runtime.measurements import best_time, cached_measurement, interpolate_cost


@dataclass
class CostProfile:
    t_decode: float
    t_verify: dict  # n tokens -> seconds
    t_draft_step: float  # one chain draft step (a draft forward + logits)
    t_tree: float  # one EAGLE-2 tree draft (0 without a tree-capable draft)

    def verify(self, n: int) -> float:
        return interpolate_cost(self.t_verify, n)


def measure_profile(engine, drafter, verify_sizes=(2, 4, 8, 16, 32), tree=(10, 3, 31), seq_id: int = 7) -> CostProfile:
    """Times the library calls on a scratch sequence (and the draft's own scratch state)."""
    cfg = engine.cfg
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, cfg.vocab_size, 16)]
    engine.add_sequence(seq_id)
    try:
        engine.prefill(seq_id, prompt)

        def decode():
            engine.decode(seq_id, 1)
            engine.popn(seq_id, 1)

        t_decode = best_time(decode)
        t_verify = {}
        for n in verify_sizes:
            toks = [int(t) for t in rng.integers(0, cfg.vocab_size, n)]

            def verify(toks=toks):
                engine.batch_verify(seq_id, toks, list(range(-1, len(toks) - 1)))
                engine.commit_tree(seq_id, -1)

            t_verify[n] = best_time(verify, repeat=3)
    finally:
        engine.remove_sequence(seq_id)
    t_step = t_tree = 0.0
    if drafter is not None:
        hidden = None
        if drafter.kind == "eagle":
            engine.add_sequence(seq_id)
            try:
                hidden = engine.prefill_hidden(seq_id, prompt)
            finally:
                engine.remove_sequence(seq_id)
        drafter.begin(prompt, 1, hidden)
        t_step = best_time(lambda: drafter.chain(2, 0.0, 1.0, None), repeat=3) / 2
        if drafter.kind == "eagle":
            t_tree = best_time(lambda: drafter.tree(*tree), repeat=3)
    return CostProfile(t_decode, t_verify, t_step, t_tree)


def cached_profile(engine, drafter, ffn: str) -> CostProfile:
    """`measure_profile`, cached on disk per library file, draft library, device and FFN mode."""
    parts = [engine.device, ffn, "" if drafter is None else f"{drafter.kind}:{getattr(drafter, 'folder', '')}"]
    return cached_measurement("spec-profile", engine.art.library, parts,
                              lambda: measure_profile(engine, drafter).__dict__, parse=_profile_from_json)


def _profile_from_json(d: dict) -> CostProfile:
    return CostProfile(d["t_decode"], {int(k): v for k, v in d["t_verify"].items()}, d["t_draft_step"], d["t_tree"])


@dataclass
class SpecPolicy:
    """Chooses each round's plan from a cost profile and the running acceptance.

    ``kinds`` are the speculation kinds allowed (``chain``, ``tree`` or both); `plan` returns ``(kind, n)`` with
    n drafted tokens, or ``("plain", 0)``.
    """

    profile: CostProfile
    kinds: tuple = ("chain",)
    max_chain: int = 8
    tree_size: int = 32
    prior_accept: float = 0.6  # per-token acceptance rate before anything is observed
    probe_every: int = 16
    alpha: float = field(default=0.0, init=False)
    tree_len: float = field(default=0.0, init=False)
    observed: dict = field(default_factory=dict, init=False)  # "plain" | "spec" -> (EMA tokens/s, samples)
    _warm: set = field(default_factory=set, init=False)
    _plain_streak: int = field(default=0, init=False)

    def __post_init__(self):
        self.alpha = self.prior_accept
        self.tree_len = 1 + 2 * self.prior_accept

    def chain_rate(self, k: int) -> float:
        a = min(self.alpha, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        return tokens / (k * self.profile.t_draft_step + self.profile.verify(k + 1))

    def tree_rate(self) -> float:
        return self.tree_len / (self.profile.t_tree + self.profile.verify(self.tree_size))

    def candidates(self) -> list:
        """(modelled tokens per second, kind, drafted tokens) of every allowed plan, plain decoding included."""
        model = [(1.0 / self.profile.t_decode, "plain", 0)]
        if "chain" in self.kinds:
            model += [(self.chain_rate(k), "chain", k) for k in range(1, self.max_chain + 1)]
        if "tree" in self.kinds and self.profile.t_tree > 0:
            model.append((self.tree_rate(), "tree", self.tree_size - 1))
        return model

    def plan(self) -> tuple:
        """The model picks the best speculative plan (its acceptance estimates are what vary); whether to speculate
        at all compares measured wall-clock rates once both plain steps and speculative rounds have run (they
        include the per-round host work and launches that the library-call profile misses)."""
        rated = self.candidates()
        plain_model = rated[0][0]
        spec = max(rated[1:], key=lambda c: c[0], default=None)
        if spec is None:
            return "plain", 0
        plain_rate = self.observed["plain"][0] if self.observed.get("plain", (0, 0))[1] >= 2 else plain_model
        spec_rate = self.observed["spec"][0] if self.observed.get("spec", (0, 0))[1] >= 2 else spec[0]
        if spec_rate > plain_rate:
            self._plain_streak = 0
            return spec[1], spec[2]
        self._plain_streak += 1
        # probe speculation now and then, spending at most ~1/probe_every of the time on it
        if self._plain_streak / plain_rate >= self.probe_every * (spec[2] + 1) / max(spec_rate, 1e-9):
            self._plain_streak = 0
            return spec[1], spec[2]
        return "plain", 0

    def observe_time(self, kind: str, n: int, tokens: int, seconds: float) -> None:
        """Wall-clock of one plain step or speculative round and the tokens it emitted (moving averages of the
        plain and the speculative rate)."""
        if seconds <= 0:
            return
        key = "plain" if kind == "plain" else "spec"
        if key not in self._warm:  # the first call of a library function pays its one-off set-up: not a sample
            self._warm.add(key)
            return
        rate, count = self.observed.get(key, (tokens / seconds, 0))
        w = 0.2 if count else 1.0
        self.observed[key] = ((1 - w) * rate + w * tokens / seconds, count + 1)

    def observe(self, kind: str, drafted: int, accepted: int) -> None:
        """After a round: ``accepted`` = drafted tokens accepted (the bonus token not counted)."""
        w = 0.3
        if kind == "tree":
            self.tree_len = (1 - w) * self.tree_len + w * (accepted + 1)
        elif drafted:
            # per-token acceptance of a chain: all accepted, or accepted ones then one rejection
            a = 1.0 if accepted == drafted else accepted / (accepted + 1)
            self.alpha = (1 - w) * self.alpha + w * a
