"""Text generation over a compiled artifact: plain decoding or speculative decoding (chain / EAGLE-2 tree drafts
verified in one ``batch_verify`` call), streaming, stop tokens and stop strings.

Speculation is lossless: greedy acceptance keeps the target's argmax tokens, and with temperature > 0 recursive
rejection sampling (`blockffn.model.speculative.accept_sampling`) keeps the target's distribution.  The same
`blockffn.model.speculative` functions drive the PyTorch reference (`blockffn.model.spec_generate`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from blockffn.errors import BlockFFNError
from blockffn.model.speculative import accept_greedy, accept_sampling
from blockffn.runtime.sampling import GenerationParams, LibrarySampler

SEQ = 0


@dataclass
class SpecConfig:
    mode: str = "tree"  # off | chain | tree | auto (EAGLE draft: chain or tree, whichever measures faster)
    chain_len: int = 0  # 0 = chosen by the policy each round
    depth: int = 3
    topk: int = 10
    tree_size: int = 32  # verify tokens per round, the root included
    adaptive: bool = True  # the never-slower policy (False: always speculate with the given sizes)


@dataclass
class GenerationResult:
    tokens: list
    text: str
    prefill_s: float
    decode_s: float
    stop_reason: str  # eos | stop | length | interrupted
    accepted: list = field(default_factory=list)  # tokens emitted per verify round
    verify_sizes: list = field(default_factory=list)  # tokens per verify call
    plain_steps: int = 0
    n_prompt: int = 0

    @property
    def tok_per_s(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else float("inf")

    @property
    def prefill_tok_per_s(self) -> float:
        return self.n_prompt / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def mean_accepted(self) -> float:
        return float(np.mean(self.accepted)) if self.accepted else float("nan")


class _StopWatch:
    """Streams text deltas, holding back a tail that could still become a stop string.  Text is decoded per token
    only when something reads it (stop strings, a streaming callback): otherwise once, at the end, if wanted."""

    def __init__(self, engine, stops, on_text, want_text: bool = True):
        self.engine, self.stops, self.on_text = engine, [s for s in stops if s], on_text
        self.want_text = want_text
        self.sent = 0
        self.text = ""
        self.tokens, self.n = [], 0

    def update(self, tokens) -> bool:
        """True when a stop string appeared (self.text is then cut before it)."""
        self.tokens, self.n = tokens, len(tokens)  # (the list grows on: an EOS is appended without an update)
        if not self.stops and self.on_text is None:
            return False
        self.text = self.engine.tokenizer.decode(tokens)
        for s in self.stops:
            i = self.text.find(s)
            if i >= 0:
                self.text = self.text[:i]
                self._flush(len(self.text))
                return True
        hold = max((len(s) - 1 for s in self.stops), default=0)
        self._flush(max(self.sent, len(self.text) - hold))
        return False

    def _flush(self, upto: int) -> None:
        if self.on_text is not None and upto > self.sent:
            self.on_text(self.text[self.sent: upto])
        self.sent = max(self.sent, upto)

    def finish(self) -> None:
        if self.want_text and not self.stops and self.on_text is None:
            self.text = self.engine.tokenizer.decode(self.tokens[: self.n])
        self._flush(len(self.text))


class Generator:
    """``engine`` (target `Engine`), optional ``drafter`` (`EagleDraft` / `ModelDraft`) and speculation config."""

    def __init__(self, engine, drafter=None, spec: SpecConfig | None = None, profile=None):
        self.engine, self.drafter = engine, drafter
        self.spec = spec or SpecConfig(mode="off")
        if self.spec.mode not in ("off", "chain", "tree", "auto"):
            raise BlockFFNError(f"unknown --speculative {self.spec.mode!r}; use auto, off, chain or tree")
        if self.spec.mode != "off" and drafter is None:
            raise BlockFFNError("speculative decoding needs a draft (the artifact has no draft/; pass --draft DIR)")
        if self.spec.mode in ("tree", "auto") and drafter is not None and drafter.kind != "eagle":
            raise BlockFFNError("tree drafts need an EAGLE draft head; a draft model drafts chains "
                                "(--speculative chain)")
        self.sampler = LibrarySampler(engine)
        self.policy = None
        if self.spec.mode != "off" and self.spec.adaptive:
            from blockffn.runtime.policy import SpecPolicy, cached_profile

            prof = profile or cached_profile(engine, drafter, engine.ffn)
            kinds = ("chain", "tree") if self.spec.mode == "auto" else (self.spec.mode,)
            self.policy = SpecPolicy(prof, kinds, tree_size=self.spec.tree_size)

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def _eagle(self) -> bool:
        return self.drafter is not None and self.drafter.kind == "eagle"

    def _plan(self) -> tuple:
        """(kind, drafted tokens) of the next round: ("plain", 0), ("chain", k) or ("tree", nodes)."""
        if self.spec.mode == "off":
            return "plain", 0
        if self.policy is not None:
            kind, n = self.policy.plan()
            if kind == "chain" and self.spec.chain_len:
                n = self.spec.chain_len
            return kind, n
        if self.spec.mode in ("tree", "auto"):
            return "tree", self.spec.tree_size - 1
        return "chain", self.spec.chain_len or 4

    def generate(self, prompt_ids, params: GenerationParams, on_text=None, interrupted=lambda: False,
                 text: bool = True) -> GenerationResult:
        """Generate after ``prompt_ids``.  ``on_text`` streams text deltas; ``text=False`` skips decoding the text
        (token ids only: benchmarks, artifacts shipped without a tokenizer)."""
        e = self.engine
        if not prompt_ids:
            raise BlockFFNError("the prompt encodes to zero tokens")
        headroom = max(self.spec.tree_size, self.spec.chain_len + 1) if self.spec.mode != "off" else 0
        if len(prompt_ids) + params.max_tokens + headroom > e.context_window:
            raise BlockFFNError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens {params.max_tokens}"
                                f"{f' + {headroom} verify tokens' if headroom else ''} exceeds the context window of "
                                f"{e.context_window}")
        rng = np.random.default_rng(params.seed)
        stop_ids = set(params.stop_token_ids) | ({e.cfg.eos_token_id} if params.stop_at_eos else set())
        watch = _StopWatch(e, params.stop, on_text, want_text=text)
        e.reset()
        if e.ffn == "auto":  # before our sequence takes a slot (a library built for one sequence has no other)
            e.measure_prefill_choice()
        e.add_sequence(SEQ)
        res = GenerationResult([], "", 0.0, 0.0, "length", n_prompt=len(prompt_ids))
        try:
            t0 = time.perf_counter()
            if self._eagle:
                hidden = e.prefill_hidden(SEQ, prompt_ids)
                logits = e.get_logits(hidden[-1:])[0]
            else:
                hidden = None
                logits = e.prefill(SEQ, prompt_ids)
            root = self.sampler.choose(logits, [], params, rng)
            res.prefill_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            if self.drafter is not None and self.spec.mode != "off":
                self.drafter.begin(prompt_ids, root, hidden)
            pending_tokens, pending_hidden = [], []  # emitted during plain steps, not yet read by an EAGLE draft
            new = [root]
            while True:
                stop = self._emit(res, new, stop_ids, params, watch)
                if stop or interrupted():
                    res.stop_reason = stop or "interrupted"
                    break
                root = res.tokens[-1]
                kind, k = self._plan()
                t_round = time.perf_counter()
                if kind == "plain":
                    new = self._plain_step(root, res, params, rng, pending_tokens, pending_hidden)
                else:
                    if pending_tokens:  # the draft catches up on plain-step tokens: a cost of speculating
                        self.drafter.accept(pending_tokens, np.stack(pending_hidden))  # now, charged to the round
                        pending_tokens, pending_hidden = [], []
                    new = self._spec_round(root, kind, k, res, params, rng)
                if self.policy is not None:
                    self.policy.observe_time(kind, k, len(new), time.perf_counter() - t_round)
            res.decode_s = time.perf_counter() - t1
        finally:
            e.remove_sequence(SEQ)
        watch.finish()
        res.text = watch.text
        return res

    def _emit(self, res, new, stop_ids, params, watch) -> str | None:
        for tok in new:
            res.tokens.append(int(tok))
            if tok in stop_ids:
                return "eos"
            if watch.update(res.tokens):
                return "stop"
            if len(res.tokens) >= params.max_tokens:
                return "length"
        return None

    def _plain_step(self, root, res, params, rng, pending_tokens, pending_hidden) -> list:
        e = self.engine
        res.plain_steps += 1
        if self._eagle and self.spec.mode != "off":
            # keep what the draft will need: slot (h_j, x_{j+1}) pairs this step's hidden with the token it yields
            h = e.decode_hidden(SEQ, root)
            tok = self.sampler.choose(e.get_logits(h[None])[0], res.tokens, params, rng)
            pending_tokens.append(tok)
            pending_hidden.append(h)
            return [tok]
        return [self.sampler.choose(e.decode(SEQ, root), res.tokens, params, rng)]

    def _spec_round(self, root, kind, k, res, params, rng) -> list:
        e, d = self.engine, self.drafter
        if kind == "chain":
            tree, draft_probs = d.chain(k, 0.0 if params.is_greedy else params.temperature, params.top_p, rng)
        else:
            tree, draft_probs = d.tree(self.spec.topk, self.spec.depth, k), None
        tokens = [root] + [int(t) for t in tree.tokens]
        parent_ptr = [-1] + [int(p) + 1 for p in tree.parents]
        if self._eagle:
            hidden = e.verify_hidden(SEQ, tokens, parent_ptr)
            logits = e.get_logits(hidden)
        else:
            hidden, logits = None, e.batch_verify(SEQ, tokens, parent_ptr)
        if params.repetition_penalty != 1.0:  # each row's history: the generated tokens + its tree path
            histories = [res.tokens + self._path_tokens(tree, row - 1) for row in range(len(tokens))]
            logits = self.sampler.penalised(logits, histories, params.repetition_penalty)
        if params.is_greedy:
            path, bonus = accept_greedy(tree, logits)
        else:
            path, bonus = accept_sampling(tree, self.sampler.probs(logits, params), draft_probs, rng)
        e.commit_tree(SEQ, int(path[-1]) + 1 if len(path) else 0)
        new = [int(t) for t in tree.tokens[path]] + [int(bonus)]
        rows = np.concatenate([[0], 1 + path]).astype(np.int64)
        d.accept(new, None if hidden is None else hidden[rows])
        res.accepted.append(len(new))
        res.verify_sizes.append(len(tokens))
        if self.policy is not None:
            self.policy.observe(kind, len(tree), len(path))
        return new

    @staticmethod
    def _path_tokens(tree, node: int) -> list:
        out = []
        while node >= 0:
            out.append(int(tree.tokens[node]))
            node = int(tree.parents[node])
        return out[::-1]
