"""Speculative generation with the PyTorch target and EAGLE draft: wires model calls to `speculative.py`.

One round: the draft proposes a chain or an EAGLE-2 tree after the root (the last emitted token), the target
verifies ``[root] + tree`` in one forward with a tree mask, the accepted path plus a bonus token are emitted, the
target's KV cache keeps only the accepted rows, and the draft re-reads the accepted tokens with the target's true
hidden states.  Invariant between rounds: the target cache holds every emitted token but the root, and the draft
cache holds one slot per target cache entry (slot j = (h_j, x_{j+1})).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from blockffn.errors import BlockFFNError
from blockffn.model.draft import EagleDraftHead
from blockffn.model.generate import SamplingParams
from blockffn.model.modeling import BlockFFNForCausalLM, KVCache
from blockffn.model.speculative import (DraftTree, DynamicTree, accept_greedy, accept_sampling, chain_tree,
                                        kept_rows, sample_index, sampling_probs, verify_layout)


@dataclass
class SpecParams:
    mode: Literal["chain", "tree"] = "tree"
    chain_len: int = 4  # drafted tokens per round in chain mode
    depth: int = 3  # tree levels (draft passes per round, the root's included)
    topk: int = 10
    tree_size: int = 32  # tokens per verify call, the root included (tree_size - 1 drafted nodes)

    @property
    def verify_len(self) -> int:
        return self.chain_len + 1 if self.mode == "chain" else self.tree_size


def keep_cache_rows(cache: KVCache, start: int, rows: np.ndarray) -> None:
    """Keep entries [0, start) plus ``start + rows`` (the accepted rows of a verify call), in that order."""
    idx = torch.cat([torch.arange(start), start + torch.as_tensor(rows, dtype=torch.long)])
    cache.keys = [k[:, :, idx] for k in cache.keys]
    cache.values = [v[:, :, idx] for v in cache.values]


def verify_tree(target: BlockFFNForCausalLM, cache: KVCache, tree: DraftTree, root: int, sparse: bool = False):
    """One target forward over ``[root] + tree.tokens`` with the tree mask; the cache grows by 1 + N rows."""
    past = cache.length
    ids, positions, tree_mask = verify_layout(tree, root, past)
    mask = torch.cat([torch.ones(len(ids), past, dtype=torch.bool), torch.from_numpy(tree_mask)], dim=1)
    return target(torch.from_numpy(ids)[None], positions=torch.from_numpy(positions)[None], cache=cache,
                  mask=mask[None, None], sparse=sparse)


class Drafter:
    """The draft's side of a round; its cache is rolled back to the committed slots after drafting."""

    def __init__(self, draft: EagleDraftHead, params: SamplingParams, rng: np.random.Generator):
        self.draft, self.params, self.rng = draft, params, rng
        self.cache = KVCache()
        d2t = draft.d2t
        self.token_map = None if d2t is None else d2t.numpy()
        self.vocab = draft.config.vocab_size
        self.greedy = params.greedy or params.temperature <= 0

    @torch.no_grad()
    def read(self, tokens: list[int], hidden: torch.Tensor) -> None:
        """Commit slots (h_j, x_{j+1}) for hidden [T, d] and the tokens that follow them."""
        out = self.draft(torch.tensor([tokens]), hidden[None], cache=self.cache)
        self.h, self.logits = out.hidden[0, -1], out.logits[0, -1]

    def _target_ids(self, cols) -> np.ndarray:
        cols = np.asarray(cols, dtype=np.int64)
        return cols if self.token_map is None else self.token_map[cols]

    @torch.no_grad()
    def chain(self, k: int) -> tuple[DraftTree, np.ndarray | None]:
        base = self.cache.length
        toks, q_rows = [], []
        h, logits = self.h, self.logits
        for i in range(k):
            if self.greedy:
                col = int(logits.argmax())
            else:
                q = sampling_probs(logits.numpy(), self.params.temperature)
                col = sample_index(q, self.rng)
                full = np.zeros(self.vocab)
                full[self._target_ids(np.arange(len(q)))] = q
                q_rows.append(full)
            toks.append(int(self._target_ids([col])[0]))
            if i < k - 1:
                out = self.draft(torch.tensor([[toks[-1]]]), h[None, None], cache=self.cache)
                h, logits = out.hidden[0, -1], out.logits[0, -1]
        self.cache.truncate(base)
        draft_probs = None if self.greedy else np.stack(q_rows + [np.zeros(self.vocab)])
        return chain_tree(toks), draft_probs

    @torch.no_grad()
    def tree(self, spec: SpecParams) -> DraftTree:
        base = self.cache.length
        builder = DynamicTree(spec.topk, spec.depth, spec.tree_size - 1, self.token_map)
        builder.start(torch.log_softmax(self.logits.float(), -1).numpy())
        slot_h: list[torch.Tensor] = []
        while not builder.done:
            toks, depths, hidden_from, tree_mask = builder.frontier_inputs()
            hid = torch.stack([self.h if s < 0 else slot_h[s] for s in hidden_from])
            k = len(toks)
            mask = torch.cat([torch.ones(k, base, dtype=torch.bool), torch.from_numpy(tree_mask)], dim=1)
            positions = torch.from_numpy(base - 1 + depths)  # slot of a node at position p sits at p - 1
            out = self.draft(torch.from_numpy(toks)[None], hid[None], positions=positions[None],
                             cache=self.cache, mask=mask[None, None])
            slot_h += list(out.hidden[0])
            builder.expand(torch.log_softmax(out.logits[0].float(), -1).numpy())
        self.cache.truncate(base)
        return builder.finish()


@torch.no_grad()
def speculative_generate(target: BlockFFNForCausalLM, draft: EagleDraftHead, prompt_ids: list[int],
                         params: SamplingParams, spec: SpecParams | None = None, sparse: bool = False) -> dict:
    """Generate like `generate.generate` (same tokens when greedy; same distribution when sampling), drafting with
    ``draft``.  Returns tokens, timings and acceptance stats (``accepted``: tokens emitted per verify call)."""
    spec = spec or SpecParams()
    cfg = target.config
    if not prompt_ids:
        raise BlockFFNError("the prompt encodes to zero tokens")
    if len(prompt_ids) + params.max_tokens + spec.verify_len > cfg.max_position_embeddings:
        raise BlockFFNError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens {params.max_tokens} + "
                            f"{spec.verify_len} verify tokens exceeds the context window of "
                            f"{cfg.max_position_embeddings}")
    rng = np.random.default_rng(params.seed)
    greedy = params.greedy or params.temperature <= 0
    drafter = Drafter(draft, params, rng)
    cache = KVCache()
    t0 = time.perf_counter()
    out = target(torch.tensor([prompt_ids]), cache=cache, sparse=sparse)
    logits = out.logits[0, -1].numpy()
    root = int(logits.argmax()) if greedy else sample_index(sampling_probs(logits, params.temperature,
                                                                           params.top_p), rng)
    drafter.read(prompt_ids[1:] + [root], out.hidden[0])
    t_prefill = time.perf_counter() - t0
    tokens, accepted = [root], []
    t1 = time.perf_counter()
    while len(tokens) < params.max_tokens and not (params.stop_at_eos and tokens[-1] == cfg.eos_token_id):
        if spec.mode == "chain":
            tree, draft_probs = drafter.chain(spec.chain_len)
        else:
            tree, draft_probs = drafter.tree(spec), None
        past = cache.length
        v = verify_tree(target, cache, tree, root, sparse)
        vlogits = v.logits[0].numpy()
        if greedy:
            path, bonus = accept_greedy(tree, vlogits)
        else:
            path, bonus = accept_sampling(tree, sampling_probs(vlogits, params.temperature, params.top_p),
                                          draft_probs, rng)
        rows = kept_rows(path)
        keep_cache_rows(cache, past, rows)
        new = [int(t) for t in tree.tokens[path]] + [bonus]
        accepted.append(len(new))
        drafter.read(new, v.hidden[0, torch.from_numpy(rows)])
        tokens += new
        root = bonus
    tokens = tokens[: params.max_tokens]
    if params.stop_at_eos and cfg.eos_token_id in tokens:
        tokens = tokens[: tokens.index(cfg.eos_token_id) + 1]
    t_decode = time.perf_counter() - t1
    return {"tokens": tokens, "prefill_s": t_prefill, "decode_s": t_decode,
            "tok_per_s": len(tokens) / t_decode if t_decode > 0 else float("inf"),
            "accepted": accepted, "mean_accepted": float(np.mean(accepted)) if accepted else float("nan")}
