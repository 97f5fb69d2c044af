"""EAGLE draft head, its trainer and the speculative-decoding reference (tree layout, greedy and sampling
acceptance) against plain decoding."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from blockffn import default_model_path
from blockffn.data.prepare import load_tokenizer, read_documents
from blockffn.errors import CheckpointError, ConfigError
from blockffn.model import BlockFFNForCausalLM, KVCache, load_model
from blockffn.model.checkpoint import read_tensors
from blockffn.model.draft import DraftConfig, EagleDraftHead, bundled_draft_path, load_draft, save_draft
from blockffn.model.generate import SamplingParams, generate
from blockffn.model.spec_generate import SpecParams, Drafter, speculative_generate, verify_tree
from blockffn.model.speculative import (DraftTree, DynamicTree, accept_greedy, accept_sampling, chain_tree,
                                        sampling_probs, verify_layout)
from blockffn.train.draft_trainer import DraftTrainConfig, DraftTrainer, draft_losses
from blockffn.train.evaluate import window_batch
from tests.conftest import small_config

BUNDLED = default_model_path()


@pytest.fixture(scope="module")
def target():
    return load_model(BUNDLED)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(BUNDLED)


@pytest.fixture(scope="module")
def bundled_draft(target):
    return load_draft(bundled_draft_path(BUNDLED), target)


def cfg_scale(draft):
    return draft.config.hidden_size / draft.config.dim_model_base


def random_draft(target, draft_vocab_size=None, seed=0):
    cfg = DraftConfig.from_target(target.config, draft_vocab_size=draft_vocab_size)
    draft = EagleDraftHead(cfg).init_weights(seed)
    if cfg.reduced_vocab:
        draft.d2t.copy_(torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(seed))
                        [: cfg.draft_vocab_size])
    return draft.bind_target(target).eval()


@pytest.fixture(scope="module")
def prompts():
    docs = read_documents(BUNDLED.parent / "heldout.txt.xz")
    return [d[:120] for d in docs if len(d) > 200][:2]


# ---------------------------------------------------------------------------------------------------------- module
@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_save_load_round_trip_is_bit_exact(tmp_path, attention):
    target = BlockFFNForCausalLM(small_config(attention)).init_weights(seed=1).eval()
    draft = random_draft(target, draft_vocab_size=100)
    save_draft(draft, tmp_path / "d")
    loaded = load_draft(tmp_path / "d", target)
    for (name, a), (_, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    ids, h = torch.randint(0, 512, (2, 7)), torch.randn(2, 7, target.config.hidden_size)
    assert torch.equal(draft(ids, h).logits, loaded(ids, h).logits)
    out = loaded(ids, h)
    head_rows = target.lm_head.weight[loaded.d2t]  # the reduced head is rows d2t of the target's head
    assert torch.equal(out.logits, torch.nn.functional.linear(out.hidden / cfg_scale(loaded), head_rows))
    assert "embed_tokens" not in "".join(read_tensors(tmp_path / "d"))  # the target's embedding is not stored


@torch.no_grad()
def test_forward_with_kv_cache_equals_full_forward(target):
    draft = random_draft(target)
    ids, h = torch.randint(0, 4096, (1, 9)), torch.randn(1, 9, target.config.hidden_size) * 0.4
    full = draft(ids, h)
    cache = KVCache()
    parts = [draft(ids[:, a:b], h[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 9))]
    hidden = torch.cat([p.hidden for p in parts], dim=1)
    torch.testing.assert_close(hidden, full.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p.logits for p in parts], 1), full.logits, rtol=1e-5, atol=1e-5)


def test_mismatched_target_is_one_line_error(target):
    draft = random_draft(BlockFFNForCausalLM(small_config("gqa")).init_weights(seed=1))
    with pytest.raises(CheckpointError, match="hidden_size 256 and vocab_size 512.*train-draft"):
        draft.bind_target(BlockFFNForCausalLM(small_config("gqa", vocab_size=600)))
    with pytest.raises(ConfigError, match="not a draft head config"):
        load_draft(BUNDLED)


def test_bundled_target_ignores_its_draft_folder(target):
    assert (BUNDLED / "draft" / "model.safetensors").exists()
    assert not any(k.startswith(("fc.", "layers.")) for k in read_tensors(BUNDLED))
    stored = read_tensors(BUNDLED)  # the target holds exactly the tensors of its own checkpoint, no draft weights
    params = dict(target.named_parameters())
    assert set(params) == set(stored) and all(params[k].shape == stored[k].shape for k in stored)
    assert target.num_parameters() == sum(t.numel() for t in stored.values())


# ---------------------------------------------------------------------------------------------------------- trees
def test_verify_layout_masks_ancestors():
    tree = DraftTree(np.array([5, 6, 7, 8]), np.array([-1, -1, 0, 2]), np.array([1, 1, 2, 3]))
    ids, pos, mask = verify_layout(tree, root_token=9, root_position=10)
    assert ids.tolist() == [9, 5, 6, 7, 8] and pos.tolist() == [10, 11, 11, 12, 13]
    assert mask.astype(int).tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0],
                                         [1, 1, 0, 1, 1]]


def test_dynamic_tree_keeps_best_candidates_with_their_parents():
    # the draft's log-probs after a path are a fixed random function of the path (the token ids after the root)
    rows = {}
    logp = lambda path: rows.setdefault(path, np.log(np.random.default_rng(list(path) + [len(path)])  # noqa: E731
                                                     .dirichlet(np.ones(50) * 0.1)))
    b = DynamicTree(topk=4, depth=3, num_nodes=20)
    b.start(logp(()))
    slot_path = {}  # draft KV slot -> the path of the node expanded into it
    while not b.done:
        toks, depths, hidden_from, mask = b.frontier_inputs()
        assert len(toks) == 4 and mask.shape[1] == len(b.slot_of) and mask[np.arange(4), -4 + np.arange(4)].all()
        before = mask.shape[1] - len(toks)
        paths = [(slot_path[h] if h >= 0 else ()) + (int(t),) for h, t in zip(hidden_from, toks)]
        slot_path.update({before + r: path for r, path in enumerate(paths)})
        assert [len(path) for path in paths] == depths.tolist()
        b.expand(np.stack([logp(path) for path in paths]))
    tree = b.finish()
    assert len(tree) == 20 and np.all(tree.parents < np.arange(20)) and tree.depths.max() <= 3
    assert all(tree.depths[i] == (1 if p < 0 else tree.depths[p] + 1) for i, p in enumerate(tree.parents))

    # brute force: level 1 = the 4 best tokens after the root; each level the 4 best children of every frontier
    # path are candidates and the 4 best candidates are the next frontier; the tree = the 20 best candidates
    def score(path):
        return sum(logp(path[:i])[t] for i, t in enumerate(path))

    def children(path):
        return [path + (t,) for t in sorted(range(50), key=lambda t: -logp(path)[t])[:4]]

    candidates, frontier = [], [()]
    for _ in range(3):
        level = [c for f in frontier for c in children(f)]
        candidates += level
        frontier = sorted(level, key=score, reverse=True)[:4]
    expected = set(sorted(candidates, key=score, reverse=True)[:20])
    assert {len(path) for path in expected} == {1, 2, 3}  # the frontier choice at each level matters
    got = []
    for i, p in enumerate(tree.parents):
        got.append((got[p] if p >= 0 else ()) + (int(tree.tokens[i]),))
    assert set(got) == expected and len(got) == 20


def draft_and_verify(target, draft, ids, spec):
    """Prefill ids[:-1], grow a draft tree after ids[-1] and run the target's verify call on it."""
    cache = KVCache()
    out = target(torch.tensor([ids[:-1]]), cache=cache)
    drafter = Drafter(draft, SamplingParams(greedy=True), np.random.default_rng(0))
    drafter.read(ids[1:], out.hidden[0])
    tree = drafter.tree(spec)
    return tree, verify_tree(target, cache, tree, ids[-1])


@torch.no_grad()
def test_tree_verify_logits_equal_sequential_decoding(target, bundled_draft, tokenizer, prompts):
    """Every node's verify row equals decoding its root path one token at a time (tree mask and positions)."""
    ids = tokenizer.encode(prompts[0]).ids
    tree, v = draft_and_verify(target, bundled_draft, ids, SpecParams(depth=3, topk=3, tree_size=8))
    for i in range(len(tree)):
        path, node = [], i
        while node >= 0:
            path.insert(0, int(tree.tokens[node]))
            node = tree.parents[node]
        seq = target(torch.tensor([ids + path]))
        torch.testing.assert_close(v.logits[0, 1 + i], seq.logits[0, -1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_draft_tree_expansion_equals_sequential_drafting(target, bundled_draft, tokenizer, prompts):
    """Growing the tree with one masked draft call per level gives the tree that drafting each frontier node's
    path one token at a time gives (draft tree mask, slot positions and hidden hand-over)."""
    ids = tokenizer.encode(prompts[1]).ids
    drafter = Drafter(bundled_draft, SamplingParams(greedy=True), np.random.default_rng(0))
    drafter.read(ids[1:], target(torch.tensor([ids[:-1]])).hidden[0])
    spec = SpecParams(depth=3, topk=4, tree_size=12)
    tree = drafter.tree(spec)
    builder = DynamicTree(spec.topk, spec.depth, spec.tree_size - 1)
    builder.start(torch.log_softmax(drafter.logits, -1).numpy())
    while not builder.done:
        rows = []
        for c in builder.frontier:
            path, node = [], int(c)
            while node >= 0:
                path.insert(0, builder.tokens[node])
                node = builder.parents[node]
            cache, h = KVCache(list(drafter.cache.keys), list(drafter.cache.values)), drafter.h
            for tok in path:
                out = bundled_draft(torch.tensor([[tok]]), h[None, None], cache=cache)
                h = out.hidden[0, -1]
            rows.append(torch.log_softmax(out.logits[0, -1], -1).numpy())
        builder.frontier_inputs()  # keeps the builder's slot bookkeeping in step
        builder.expand(np.stack(rows))
    ref = builder.finish()
    assert tree.tokens.tolist() == ref.tokens.tolist() and tree.parents.tolist() == ref.parents.tolist()
    assert tree.depths.max() == 3


# ---------------------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("which", ["bundled", "random", "random-reduced-vocab"])
def test_greedy_speculative_equals_plain_greedy(target, bundled_draft, tokenizer, prompts, which):
    draft = {"bundled": lambda: bundled_draft, "random": lambda: random_draft(target),
             "random-reduced-vocab": lambda: random_draft(target, draft_vocab_size=512)}[which]()
    params = SamplingParams(max_tokens=24, greedy=True)
    for prompt in prompts if which == "bundled" else prompts[:1]:
        ids = tokenizer.encode(prompt).ids
        ref = generate(target, ids, params)["tokens"]
        for spec in (SpecParams(mode="chain", chain_len=4), SpecParams(mode="tree")):
            r = speculative_generate(target, draft, ids, params, spec)
            assert r["tokens"] == ref, (which, spec.mode)
            assert sum(r["accepted"]) + 1 >= len(ref)
    if which == "bundled":
        assert r["mean_accepted"] > 1.5  # a trained draft gets more than the bonus token through


@torch.no_grad()
def test_greedy_speculative_equals_plain_greedy_with_gqa_target():
    target = BlockFFNForCausalLM(small_config("gqa")).init_weights(seed=2).eval()
    draft = random_draft(target, draft_vocab_size=300, seed=1)
    ids = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=16, greedy=True, stop_at_eos=False)
    ref = generate(target, ids, params)["tokens"]
    for spec in (SpecParams(mode="chain", chain_len=3), SpecParams(mode="tree", depth=3, topk=4, tree_size=12)):
        assert speculative_generate(target, draft, ids, params, spec)["tokens"] == ref, spec.mode


def test_accept_greedy_takes_longest_matching_path():
    tree = DraftTree(np.array([3, 4, 1, 2]), np.array([-1, -1, 1, 2]), np.array([1, 1, 2, 3]))
    logits = np.zeros((5, 6))
    logits[0, 4] = logits[2, 1] = logits[3, 5] = 1  # root -> 4 (node 1) -> 1 (node 2) -> bonus 5
    path, bonus = accept_greedy(tree, logits)
    assert path.tolist() == [1, 2] and bonus == 5


# ---------------------------------------------------------------------------------------------------------- sampling
def total_variation(samples, p):
    return 0.5 * np.abs(np.bincount(samples, minlength=len(p)) / len(samples) - p).sum()


N_SAMPLES = 10000
TV_TOL = 0.025  # expected TV of 10k samples over <= 11 outcomes is <= 0.015; a biased scheme is off by > 0.05


def _first_tokens(tree, target_probs, draft_probs, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(N_SAMPLES):
        path, bonus = accept_sampling(tree, target_probs, draft_probs, rng)
        out.append(tree.tokens[path[0]] if len(path) else bonus)
    return np.asarray(out)


def test_chain_speculative_sampling_keeps_target_distribution():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(8), size=4)
    q = rng.dirichlet(np.ones(8), size=4)
    # the chain is drawn from q afresh for every sample; the first emitted token must follow p[0]
    draws = []
    r = np.random.default_rng(2)
    for _ in range(N_SAMPLES):
        tree = chain_tree([r.choice(8, p=q[0]), r.choice(8, p=q[1]), r.choice(8, p=q[2])])
        path, bonus = accept_sampling(tree, p, q, r)
        draws.append(tree.tokens[path[0]] if len(path) else bonus)
    assert total_variation(np.asarray(draws), p[0]) < TV_TOL
    assert total_variation(np.asarray(draws), q[0]) > 5 * TV_TOL  # the draft's own law is far from it


def test_tree_sampling_with_deterministic_siblings_keeps_target_distribution():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(8), size=5)
    tree = DraftTree(np.array([2, 5, 7, 1]), np.array([-1, -1, -1, 0]), np.array([1, 1, 1, 2]))
    draws = _first_tokens(tree, p, None)
    assert total_variation(draws, p[0]) < TV_TOL


def test_tree_sampling_with_siblings_drawn_without_replacement_keeps_target_distribution():
    r = np.random.default_rng(4)
    p = r.dirichlet(np.ones(6), size=4)
    q = r.dirichlet(np.ones(6), size=4)
    draws = []
    for _ in range(N_SAMPLES):
        first = r.choice(6, p=q[0])
        q2 = q[0].copy()
        q2[first] = 0
        second = r.choice(6, p=q2 / q2.sum())
        tree = DraftTree(np.array([first, second, r.choice(6, p=q[1])]), np.array([-1, -1, 0]),
                         np.array([1, 1, 2]))
        path, bonus = accept_sampling(tree, p, q, r)
        draws.append(tree.tokens[path[0]] if len(path) else bonus)
    assert total_variation(np.asarray(draws), p[0]) < TV_TOL


@torch.no_grad()
def test_real_model_tree_sampling_keeps_first_token_distribution(target, bundled_draft, tokenizer, prompts):
    """A real EAGLE-2 tree and real verify probabilities (temperature 0.8, top-p 0.95)."""
    tree, v = draft_and_verify(target, bundled_draft, tokenizer.encode(prompts[1]).ids, SpecParams())
    probs = sampling_probs(v.logits[0].numpy(), 0.8, 0.95)
    draws = _first_tokens(tree, probs, None)
    assert set(np.unique(draws)) <= set(np.flatnonzero(probs[0] > 0))
    # outcomes: each of the root's drafted children, and everything else as one bucket (the nucleus has hundreds
    # of tokens, too many to estimate one by one from N_SAMPLES draws)
    kids = tree.tokens[tree.children(-1)]
    bucket = {int(t): i for i, t in enumerate(kids)}
    grouped = np.asarray([bucket.get(int(t), len(kids)) for t in draws])
    p_grouped = np.append(probs[0][kids], 1 - probs[0][kids].sum())
    assert total_variation(grouped, p_grouped) < TV_TOL


def test_sampling_probs_match_generate_sample_next():
    from blockffn.model.generate import sample_next

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    p = sampling_probs(logits.numpy(), 0.7, 0.9)
    gen = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, SamplingParams(temperature=0.7, top_p=0.9), gen) for _ in range(5000)]
    assert set(draws) <= set(np.flatnonzero(p > 0)) and total_variation(np.asarray(draws), p) < 0.04


def test_speculative_sampling_runs_and_is_seeded(target, bundled_draft, tokenizer, prompts):
    ids = tokenizer.encode(prompts[0]).ids
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=3, stop_at_eos=False)
    for mode in ("chain", "tree"):
        a = speculative_generate(target, bundled_draft, ids, params, SpecParams(mode=mode))
        b = speculative_generate(target, bundled_draft, ids, params, SpecParams(mode=mode))
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 12


# ---------------------------------------------------------------------------------------------------------- training
def test_training_reduces_loss(tmp_path, target):
    text = tmp_path / "t.txt"
    docs = read_documents(BUNDLED.parent / "heldout.txt.xz")[:60]
    text.write_text("\n\n".join(docs))
    tc = DraftTrainConfig(target_model=str(BUNDLED), texts=[str(text)], output_dir=str(tmp_path / "out"), steps=12,
                          batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_tokens=256, threads=1,
                          holdout_fraction=0.1, draft_vocab_size=1024)
    trainer = DraftTrainer(tc, log=lambda *a: None)
    fixed = window_batch(trainer.train_split, [0, 40, 80, 120], 32)

    def loss():
        with torch.no_grad():
            r = draft_losses(trainer.draft, trainer.target, fixed)
        return (r["v"] + 0.1 * r["p"]).item()

    before = loss()
    result = trainer.train()
    assert result["step"] == 12 and loss() < 0.8 * before
    loaded = load_draft(tmp_path / "out", target)
    assert loaded.config.draft_vocab_size == 1024 and (tmp_path / "out" / "training_summary.json").exists()


# ---------------------------------------------------------------------------------------------------------- CLI
def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "blockffn.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_train_draft_help():
    r = _cli("train-draft", "--help")
    assert r.returncode == 0 and "--target-model" in r.stdout and "--time-budget" in r.stdout


def test_generate_with_mismatched_draft_fails_with_one_line(tmp_path):
    small = BlockFFNForCausalLM(small_config("mla")).init_weights(seed=1)
    save_draft(random_draft(small), tmp_path / "d")
    r = _cli("generate", "--draft", tmp_path / "d", "--prompt", "The sea", "--max-tokens", 4, "--greedy")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "vocab_size 512" in lines[0] and "train-draft" in lines[0]


def test_generate_with_bundled_draft_matches_plain_greedy(target, tokenizer):
    spec = _cli("generate", "--prompt", "The whale", "--max-tokens", 16, "--greedy", "--json", "--draft",
                bundled_draft_path(BUNDLED))
    assert spec.returncode == 0, spec.stderr
    out = json.loads(spec.stdout)
    plain = generate(target, tokenizer.encode("The whale").ids, SamplingParams(max_tokens=16, greedy=True))
    assert out["tokens"] == plain["tokens"]
    # 1.0 = only the bonus token each round; the trained draft gets drafts through, at most a root-to-leaf path
    assert 1.5 < out["mean_accepted"] <= SpecParams().depth + 1


def test_train_draft_on_a_folder_without_model_fails_with_one_line(tmp_path):
    (tmp_path / "t.txt").write_text("some text\n\nmore text\n")
    r = _cli("train-draft", "--target-model", tmp_path, "--text", tmp_path / "t.txt", "--output", tmp_path / "out",
             "--steps", 1)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "config.json" in lines[0]
    assert not (tmp_path / "out").exists()
