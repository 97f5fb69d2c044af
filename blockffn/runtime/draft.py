"""Draft sources for speculative decoding over compiled libraries.

* `EagleDraft` runs the EAGLE head library built into ``ARTIFACT/draft`` (chain or EAGLE-2 tree drafts).  It
  embeds with the *target's* library and reads the target's final-norm hidden states.
* `ModelDraft` runs any smaller BlockFFN artifact with the same tokenizer (chain drafts).

Both keep their cache in step with the target's, as in `blockffn.model.spec_generate` (the PyTorch reference):
the target cache holds every emitted token but the root (the last emitted one); the EAGLE cache holds one slot
(h_j, x_{j+1}) per target entry; a model draft's cache lags until the next round feeds it the missing tokens.
"""

from __future__ import annotations

import numpy as np

from blockffn.artifacts.reader import ArtifactError, open_draft
from blockffn.errors import BlockFFNError
from blockffn.model.speculative import DraftTree, DynamicTree, chain_tree, sample_index, sampling_probs
from blockffn.runtime.engine import Engine, PagedModel


def _draw(logits: np.ndarray, temperature: float, top_p: float, rng) -> tuple[int, np.ndarray | None]:
    """A draft token: argmax when greedy, else a sample and the distribution it came from (for rejection)."""
    if temperature <= 0:
        return int(np.argmax(logits)), None
    q = sampling_probs(logits, temperature, top_p)
    return sample_index(q, rng), q


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


class EagleDraft(PagedModel):
    """The compiled EAGLE head (functions: fuse_embed_hidden_states, prefill/batch_verify_to_last_hidden_states,
    get_logits)."""

    kind = "eagle"

    def __init__(self, folder, target: Engine, seq_id: int = 0, verify_md5: bool = True):
        self.art = open_draft(folder, verify_md5=verify_md5)
        m = self.art.manifest
        if (m["hidden_size"], m["vocab_size"]) != (target.cfg.hidden_size, target.cfg.vocab_size):
            raise ArtifactError(f"{folder}: draft made for a model with hidden_size {m['hidden_size']} and vocabulary "
                                f"{m['vocab_size']}, the target has {target.cfg.hidden_size} and "
                                f"{target.cfg.vocab_size}")
        built_for = m.get("target", {}).get("name")
        if built_for != target.art.manifest["target"]["name"]:
            raise ArtifactError(f"{folder}: draft library built for target {built_for}, the model's for "
                                f"{target.art.manifest['target']['name']}; recompile both with blockffn-compile")
        super().__init__(self.art.path, self.art.library, self.art.param_names, target.device, target.max_batch,
                         target.context_window, target.prefill_chunk, m["hidden_size"], m["functions"],
                         m["dtype"])
        self.target, self.seq = target, seq_id
        tm = m.get("token_map")
        self.token_map = None if tm is None else np.asarray(tm, dtype=np.int64)

    # ------------------------------------------------------------------------------------------ library calls
    def _fused(self, token_ids, hidden: np.ndarray):
        n, d = len(token_ids), self.hidden_size
        emb = self.target._reshaped_embeds(list(token_ids), (1, n, d))
        h = self._tensor(np.ascontiguousarray(hidden, dtype=self.dtype_np).reshape(1, n, d))
        return self.vm["fuse_embed_hidden_states"](emb, h, self.params)

    def forward(self, token_ids, hidden: np.ndarray, parent_ptr=None) -> np.ndarray:
        """Draft outputs f [n, d] for slots (hidden[i], token_ids[i]); a tree call when ``parent_ptr`` is given."""
        x = self._fused(token_ids, hidden)
        if parent_ptr is None:
            out = self._forward("prefill_to_last_hidden_states", [self.seq], [len(token_ids)], [x])
        else:
            out = self._forward("batch_verify_to_last_hidden_states", [self.seq], [len(token_ids)], [x],
                                tree_parent_ptr=parent_ptr)
        return out.numpy()[0]

    def logits(self, f: np.ndarray) -> np.ndarray:
        """Draft-vocabulary logits [n, V_draft] of outputs f [n, d]."""
        return self.vm["get_logits"](self._tensor(np.ascontiguousarray(f, dtype=self.dtype_np)), self.params).numpy()

    def _target_ids(self, cols) -> np.ndarray:
        cols = np.asarray(cols, dtype=np.int64)
        return cols if self.token_map is None else self.token_map[cols]

    # ------------------------------------------------------------------------------------------ drafting
    def begin(self, prompt_ids, root: int, prompt_hidden: np.ndarray) -> None:
        self.reset()
        self.add_sequence(self.seq)
        self.read(list(prompt_ids[1:]) + [root], prompt_hidden)

    def read(self, tokens, hidden: np.ndarray) -> None:
        """Commit slots (hidden[i], tokens[i]) (true target hidden states), in prefill-sized chunks."""
        step = self.prefill_chunk
        for i in range(0, len(tokens), step):
            f = self.forward(tokens[i: i + step], hidden[i: i + step])
        self.h, self.last_logits = f[-1], self.logits(f[-1:])[0]

    def chain(self, k: int, temperature: float, top_p: float, rng) -> tuple[DraftTree, np.ndarray | None]:
        """k tokens, each from the draft's own estimate of the next hidden (EAGLE feeds its output back)."""
        greedy = temperature <= 0
        vocab = self.target.cfg.vocab_size
        h, logits, toks, q_rows, fed = self.h, self.last_logits, [], [], 0
        for i in range(k):
            col, q = _draw(logits, temperature, top_p, rng)
            if q is not None:  # draft-vocabulary distribution spread onto the target vocabulary
                full = np.zeros(vocab)
                full[self._target_ids(np.arange(len(q)))] = q
                q_rows.append(full)
            toks.append(int(self._target_ids([col])[0]))
            if i < k - 1:
                f = self.forward([toks[-1]], h[None])
                fed += 1
                h, logits = f[-1], self.logits(f[-1:])[0]
        self.popn(self.seq, fed)
        return chain_tree(toks), (None if greedy else np.stack(q_rows + [np.zeros(vocab)]))

    def tree(self, topk: int, depth: int, num_nodes: int) -> DraftTree:
        """EAGLE-2 dynamic tree.  The paged cache masks a token tree only within one call, so every expansion
        re-runs the tree drafted so far (10 + 20 slots at the defaults) and the call is discarded afterwards."""
        builder = DynamicTree(topk, depth, num_nodes, self.token_map)
        builder.start(_log_softmax(self.last_logits))
        tokens, hidden, parents, outputs = [], [], [], []
        while not builder.done:
            toks, _, hidden_from, _ = builder.frontier_inputs()
            for t, parent in zip(toks, hidden_from):
                tokens.append(int(t))
                hidden.append(self.h if parent < 0 else outputs[parent])
                parents.append(int(parent))
            outputs = list(self.forward(tokens, np.stack(hidden), parent_ptr=parents))
            self.commit_tree(self.seq, -1)
            builder.expand(_log_softmax(self.logits(np.stack(outputs[-len(toks):]))))
        return builder.finish()

    def accept(self, tokens, target_hidden: np.ndarray) -> None:
        """After verification: the emitted tokens with the target's hidden states at the accepted rows."""
        self.read(tokens, target_hidden)


class ModelDraft:
    """A separate (smaller) BlockFFN artifact drafting chains with its own decode calls."""

    kind = "model"

    def __init__(self, engine: Engine, target: Engine, seq_id: int = 0):
        if engine.cfg.vocab_size != target.cfg.vocab_size or (
                engine.art.path / "tokenizer.json").read_bytes() != (target.art.path / "tokenizer.json").read_bytes():
            raise BlockFFNError(f"draft {engine.art.path} has a different tokenizer than {target.art.path}; a draft "
                                f"model must share the target's tokenizer")
        if engine.device != target.device:
            raise BlockFFNError(f"draft {engine.art.path} runs on {engine.device}, the target on {target.device}")
        self.engine, self.seq = engine, seq_id
        self.emitted: list[int] = []

    def begin(self, prompt_ids, root: int, prompt_hidden=None) -> None:
        self.engine.reset()
        self.engine.add_sequence(self.seq)
        self.emitted = list(prompt_ids) + [root]  # the draft cache holds emitted[:committed]
        self.committed = 0

    def chain(self, k: int, temperature: float, top_p: float, rng) -> tuple[DraftTree, np.ndarray | None]:
        e, greedy = self.engine, temperature <= 0
        logits = e.prefill(self.seq, self.emitted[self.committed:])  # catch up, root included
        base = len(self.emitted)
        toks, q_rows = [], []
        for i in range(k):
            tok, q = _draw(logits, temperature, top_p, rng)
            if q is not None:
                q_rows.append(q)
            toks.append(tok)
            if i < k - 1:
                logits = e.decode(self.seq, tok)
        self._drafted, self._base = toks, base
        return chain_tree(toks), (None if greedy else np.stack(q_rows + [np.zeros_like(q_rows[0])]))

    def accept(self, tokens, target_hidden=None) -> None:
        """Keep the drafted tokens that were accepted; the rest of the draft cache is popped."""
        kept = 0
        for drafted, emitted in zip(self._drafted[:-1], tokens):
            if drafted != emitted:
                break
            kept += 1
        self.engine.popn(self.seq, len(self._drafted) - 1 - kept)
        self.committed = self._base + kept
        self.emitted += list(tokens)
