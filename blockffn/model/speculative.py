"""Speculative decoding reference, model-agnostic and numpy-only (research/blockffn.md §5.2).

These functions are the specification the compiled runtime follows; `blockffn.model.spec_generate` wires them to
the PyTorch target and draft.  Vocabulary: a *tree* holds target token ids; draft log-probs may be over a reduced
draft vocabulary, mapped with ``token_map`` (the draft's ``d2t``).

A verify call feeds the target ``[root] + tree.tokens``: the root is the last committed token (not yet in the
target's cache), node i sits at row 1 + i, at position ``root_position + depth``, and attends to the cached prefix,
its ancestors and itself (:func:`verify_layout`).  Acceptance walks from the root: greedy keeps the child equal to
the target's argmax (:func:`accept_greedy`); sampling runs recursive rejection sampling over the siblings
(:func:`accept_sampling`), which leaves the target's sampling distribution unchanged.  Both return the accepted
node indices (a root-to-leaf path prefix) and a bonus token drawn from the target at the last accepted row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockffn.nucleus import top_p_filter


@dataclass(frozen=True)
class DraftTree:
    """Drafted nodes in topological order (a parent's index is below its children's)."""

    tokens: np.ndarray  # int64 [N] target token ids
    parents: np.ndarray  # int64 [N] parent node index; -1 = the root of the verify call
    depths: np.ndarray  # int64 [N] 1 for the root's children

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self, node: int) -> np.ndarray:
        """Indices of the children of ``node`` (-1 = root) in index order (the order siblings are verified)."""
        return np.nonzero(self.parents == node)[0]


def chain_tree(tokens) -> DraftTree:
    """A chain: node i is the child of node i - 1."""
    n = len(tokens)
    return DraftTree(np.asarray(tokens, dtype=np.int64), np.arange(-1, n - 1, dtype=np.int64),
                     np.arange(1, n + 1, dtype=np.int64))


def verify_layout(tree: DraftTree, root_token: int, root_position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs of the target's verify call: ids [1+N], positions [1+N] and the tree part of the attention mask,
    bool [1+N, 1+N] (row attends column iff the column is the row itself or one of its ancestors; the root is
    everyone's ancestor).  The cached prefix is visible to every row and is not part of this mask."""
    n = len(tree)
    if n and np.any(tree.parents >= np.arange(n)):
        raise ValueError("tree nodes must come after their parents")
    mask = np.eye(n + 1, dtype=bool)
    mask[:, 0] = True
    for i in range(n):
        mask[1 + i] |= mask[1 + tree.parents[i]]
    ids = np.concatenate([[root_token], tree.tokens]).astype(np.int64)
    positions = root_position + np.concatenate([[0], tree.depths]).astype(np.int64)
    return ids, positions, mask


# ---------------------------------------------------------------------------------------------------------- EAGLE-2
def topk_children(parent_scores: np.ndarray, logp: np.ndarray, topk: int) -> tuple[np.ndarray, ...]:
    """The ``topk`` most likely children of each of k parents.  logp [k, V] (log-softmax of the draft).
    Returns (parent row [k·topk], token column [k·topk], cumulative score = parent score + logp [k·topk])."""
    logp = np.minimum(np.asarray(logp, dtype=np.float64), 0.0)
    cols = np.argsort(-logp, axis=-1, kind="stable")[:, :topk]
    rows = np.repeat(np.arange(logp.shape[0]), cols.shape[1])
    cols = cols.reshape(-1)
    return rows, cols, np.asarray(parent_scores, dtype=np.float64)[rows] + logp[rows, cols]


def best(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first; ties keep the earlier index (so parents beat children)."""
    return np.argsort(-np.asarray(scores), kind="stable")[:k]


class DynamicTree:
    """EAGLE-2 dynamic tree growth (FR-Spec ``eagle.cuh``): level 1 = the top-k tokens of the root's draft
    distribution; each further level expands the current frontier (the k best candidates of the previous level by
    cumulative log-prob) into k children each and keeps the k best as the new frontier; finally the ``num_nodes``
    best candidates of all levels form the tree.  Defaults of the official engine: depth 3, topk 10, 31 nodes
    (32 verify tokens with the root).  Candidate scores never rise along a path, so the selection contains every
    selected node's parent.

    The draft runs once per expansion on the frontier (:meth:`frontier_inputs`).  Its KV slots are appended in
    expansion order; slot s holds the frontier node expanded s-th.  ``token_map`` maps draft-vocabulary columns
    to target ids (``d2t``); all ids handed out are target ids.
    """

    def __init__(self, topk: int = 10, depth: int = 3, num_nodes: int = 31, token_map: np.ndarray | None = None):
        if topk < 1 or depth < 1 or num_nodes < 1:
            raise ValueError("topk, depth and num_nodes must be positive")
        self.topk, self.depth, self.num_nodes = topk, depth, num_nodes
        self.token_map = None if token_map is None else np.asarray(token_map, dtype=np.int64)
        self.tokens: list[int] = []  # draft-vocabulary column of each candidate
        self.parents: list[int] = []  # candidate index, -1 = root
        self.depths: list[int] = []
        self.scores: list[float] = []
        self.slot_of: dict[int, int] = {}  # expanded candidate -> draft KV slot (in expansion order)
        self.frontier = np.zeros(0, dtype=np.int64)
        self.level = 0

    def _add(self, parents, cols, scores, depth) -> np.ndarray:
        first = len(self.tokens)
        self.tokens += [int(c) for c in cols]
        self.parents += [int(p) for p in parents]
        self.depths += [depth] * len(cols)
        self.scores += [float(s) for s in scores]
        new = np.arange(first, len(self.tokens))
        return new[best(np.asarray(scores), self.topk)]

    def start(self, root_logp: np.ndarray) -> None:
        """Level 1 from the draft's log-probs after the root, [V_draft]."""
        _, cols, scores = topk_children(np.zeros(1), np.asarray(root_logp)[None], self.topk)
        self.frontier = self._add(np.full(len(cols), -1), cols, scores, 1)
        self.level = 1

    @property
    def done(self) -> bool:
        return self.level >= self.depth

    def _map(self, cols) -> np.ndarray:
        cols = np.asarray(cols, dtype=np.int64)
        return cols if self.token_map is None else self.token_map[cols]

    def frontier_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What the draft needs to expand the frontier: target token ids [k], depths [k], the hidden each one reads
        (draft slot of its parent, -1 = the draft output after the root) [k], and the mask over the tree slots
        bool [k, slots_before + k] (ancestors' slots and its own; the committed prefix is visible to all).
        A node of depth d at target position root_position + d is drafted at RoPE position root_position - 1 + d."""
        before = len(self.slot_of)
        k = len(self.frontier)
        mask = np.zeros((k, before + k), dtype=bool)
        hidden_from = np.empty(k, dtype=np.int64)
        for r, c in enumerate(self.frontier):
            p = self.parents[c]
            hidden_from[r] = -1 if p < 0 else self.slot_of[p]
            while p >= 0:
                mask[r, self.slot_of[p]] = True
                p = self.parents[p]
            mask[r, before + r] = True
        for r, c in enumerate(self.frontier):
            self.slot_of[int(c)] = before + r
        depths = np.asarray([self.depths[c] for c in self.frontier], dtype=np.int64)
        return self._map([self.tokens[c] for c in self.frontier]), depths, hidden_from, mask

    def expand(self, logp: np.ndarray) -> None:
        """Children of the frontier (in :meth:`frontier_inputs` order) from the draft's log-probs [k, V_draft]."""
        rows, cols, scores = topk_children(np.asarray(self.scores)[self.frontier], logp, self.topk)
        self.level += 1
        self.frontier = self._add(self.frontier[rows], cols, scores, self.level)

    def finish(self) -> DraftTree:
        """The ``num_nodes`` best candidates, renumbered in candidate order (parents first)."""
        keep = np.sort(best(np.asarray(self.scores), self.num_nodes))
        index = {int(c): i for i, c in enumerate(keep)}
        parents = np.asarray([-1 if self.parents[c] < 0 else index[self.parents[c]] for c in keep], dtype=np.int64)
        return DraftTree(self._map([self.tokens[c] for c in keep]), parents,
                         np.asarray([self.depths[c] for c in keep], dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------- acceptance
def accept_greedy(tree: DraftTree, target_logits: np.ndarray) -> tuple[np.ndarray, int]:
    """Longest root path whose every node equals the target's argmax at its parent's row.
    target_logits [1+N, V] from the verify call.  Returns (accepted node indices, bonus = argmax at the last)."""
    gt = np.asarray(target_logits).argmax(-1)
    path, node = [], -1
    while True:
        row = node + 1
        match = [c for c in tree.children(node) if tree.tokens[c] == gt[row]]
        if not match:
            return np.asarray(path, dtype=np.int64), int(gt[row])
        node = int(match[0])
        path.append(node)


def kept_rows(path: np.ndarray) -> np.ndarray:
    """Verify-call rows to keep after acceptance: the root and the accepted nodes, in order.  The target's KV cache
    keeps these rows (compacted behind the prefix) and their final-norm hidden states are what the draft reads
    next, paired with the tokens that follow them: (h_root, node_1), ..., (h_node_m, bonus)."""
    return np.concatenate([[0], 1 + np.asarray(path, dtype=np.int64)]).astype(np.int64)


def sample_index(p: np.ndarray, rng: np.random.Generator) -> int:
    """One index from unnormalised non-negative weights (a zero-weight index is never drawn)."""
    c = np.cumsum(p, dtype=np.float64)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def _normalised(p: np.ndarray) -> np.ndarray:
    s = p.sum()
    return p / s if s > 0 else p


def accept_sampling(tree: DraftTree, target_probs: np.ndarray, draft_probs: np.ndarray | None,
                    rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Recursive rejection sampling (SpecInfer; EAGLE): the emitted tokens follow the target's distribution.

    target_probs [1+N, V]: the target's sampling distribution after the root (row 0) and after each node (row 1+i).
    draft_probs [1+N, V] or None: row r is the distribution the children of row r's node were drawn from, one
    after another *without replacement* (a chain: one child, standard speculative sampling).  None means the
    children are deterministic (EAGLE-2 top-k), i.e. each proposal is a point mass.

    At a node: try its children in order; child c (token t) is accepted with probability min(1, p(t) / q(t));
    on rejection p <- normalise(max(p - q, 0)) and t is removed from q.  The first accepted child becomes the node;
    if none is accepted the bonus token is drawn from the residual p.
    """
    path, node = [], -1
    while True:
        row = node + 1
        p = _normalised(np.asarray(target_probs[row], dtype=np.float64).copy())
        q = None if draft_probs is None else _normalised(np.asarray(draft_probs[row], dtype=np.float64).copy())
        accepted = None
        for c in tree.children(node):
            t = int(tree.tokens[c])
            if q is None:
                q_t, q_row = 1.0, None
            else:
                q_t, q_row = q[t], q
                if q_t <= 0:
                    raise ValueError(f"node {c} (token {t}) has zero draft probability; it cannot have been drawn")
            if rng.random() < min(1.0, p[t] / q_t):
                accepted = int(c)
                break
            if q_row is None:
                p[t] = 0.0
            else:
                residual = np.maximum(p - q_row, 0.0)
                p = residual / residual.sum() if residual.sum() > 0 else p  # sum 0 only when p == q (never rejects)
                q = q.copy()
                q[t] = 0.0
                q = _normalised(q)
            p = _normalised(p)
        if accepted is None:
            return np.asarray(path, dtype=np.int64), sample_index(p, rng)
        path.append(accepted)
        node = accepted


def sampling_probs(logits: np.ndarray, temperature: float, top_p: float = 1.0) -> np.ndarray:
    """The distribution `generate.sample_next` samples from: softmax(logits / T), then nucleus top-p (the most
    likely token is always kept).  logits [..., V] -> probabilities [..., V] (float64)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(-1, keepdims=True)
    return top_p_filter(p, top_p)
