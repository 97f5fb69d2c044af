"""Speculative decoding over compiled libraries: lossless (greedy token-for-token, sampling in distribution),
the EAGLE draft library matches the PyTorch draft, the chat REPL, and the one-line errors."""

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blockffn import default_model_path
from blockffn.compiler.compile import CompileOptions, compile_model
from blockffn.errors import BlockFFNError
from blockffn.model.checkpoint import load_model
from blockffn.model.draft import DraftConfig, EagleDraftHead, load_draft, save_draft
from blockffn.model.speculative import sampling_probs
from blockffn.runtime.draft import EagleDraft, ModelDraft
from blockffn.runtime.engine import Engine
from blockffn.runtime.generation import Generator, SpecConfig
from blockffn.runtime.prefill_choice import PrefillChoice
from blockffn.runtime.sampling import GenerationParams, top_p_filter
from tests.conftest import top_p_reference

PROMPTS = ["The President said that", "In the beginning of the war, the", "Water is"]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """The bundled model compiled for cpu with an EAGLE head of reduced vocabulary, whose weights are the bundled
    trained draft's when it ships, else random (acceptance differs, losslessness must not)."""
    root = tmp_path_factory.mktemp("spec")
    target = load_model(default_model_path())
    shipped = default_model_path() / "draft"
    if (shipped / "config.json").exists():
        draft_dir = shipped
    else:
        head = EagleDraftHead(DraftConfig.from_target(target.config, draft_vocab_size=1024)).init_weights(seed=1)
        head.d2t.copy_(torch.randperm(target.config.vocab_size, generator=torch.Generator().manual_seed(0))[:1024])
        draft_dir = save_draft(head, root / "draft-src")
    out = root / "art"
    compile_model(CompileOptions(model_dir=default_model_path(), output=out, context_window=512, prefill_chunk=64,
                                 draft=str(draft_dir), debug_counts=True))
    return out, draft_dir, target


@pytest.fixture(scope="module")
def engines(art):
    out = art[0]
    return {"auto": Engine(out), "dense": Engine(out, ffn="dense")}


def _ids(engine, text):
    return engine.tokenizer.encode(text).ids


def test_draft_library_matches_pytorch_draft(art, engines):
    out, draft_dir, target = art
    e = engines["auto"]
    draft = load_draft(draft_dir, target=target)
    ed = EagleDraft(out / "draft", e)
    prompt = _ids(e, PROMPTS[0])
    e.reset()
    e.add_sequence(0)
    hidden = e.prefill_hidden(0, prompt)
    with torch.no_grad():
        ref_t = target(torch.tensor([prompt]))
        np.testing.assert_allclose(hidden, ref_t.hidden[0].numpy(), atol=1e-4)
        ed.begin(prompt, 7, hidden)
        ref = draft(torch.tensor([prompt[1:] + [7]]), ref_t.hidden)
    np.testing.assert_allclose(ed.last_logits, ref.logits[0, -1].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ed.h, ref.hidden[0, -1].numpy(), rtol=1e-4, atol=1e-4)
    # an EAGLE-2 tree drafted by the library equals the PyTorch reference's tree
    from blockffn.model.generate import SamplingParams
    from blockffn.model.spec_generate import Drafter, SpecParams

    ref_drafter = Drafter(draft, SamplingParams(greedy=True), np.random.default_rng(0))
    ref_drafter.read(prompt[1:] + [7], ref_t.hidden[0])
    ref_tree = ref_drafter.tree(SpecParams())
    tree = ed.tree(10, 3, 31)
    assert tree.tokens.tolist() == ref_tree.tokens.tolist()
    assert tree.parents.tolist() == ref_tree.parents.tolist()
    e.reset()


@pytest.mark.parametrize("ffn", ["auto", "dense"])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_greedy_speculation_is_lossless(art, engines, ffn, mode):
    e = engines[ffn]
    draft = EagleDraft(art[0] / "draft", e)
    params = GenerationParams(max_tokens=24, greedy=True, stop_at_eos=False)
    for text in PROMPTS:
        ids = _ids(e, text)
        plain = Generator(e).generate(ids, params)
        cfg = SpecConfig(mode=mode, chain_len=3, adaptive=False)
        spec = Generator(e, draft, cfg).generate(ids, params)
        assert spec.tokens == plain.tokens, (text, mode, ffn)
        longest = (cfg.chain_len if mode == "chain" else cfg.depth) + 1  # a drafted root-to-leaf path + the bonus
        assert spec.accepted and all(1 <= a <= longest for a in spec.accepted), (spec.accepted, longest)
        # every round but the last started short of max_tokens; the rounds emitted all the tokens after the first
        assert 1 + sum(spec.accepted[:-1]) < params.max_tokens == len(spec.tokens) <= 1 + sum(spec.accepted)


def test_greedy_chain_with_a_draft_model_and_the_adaptive_policy(art, engines, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKFFN_CACHE", str(tmp_path))
    e = engines["auto"]
    ids = _ids(e, PROMPTS[1])
    model_draft = ModelDraft(engines["dense"], e)  # the target's weights as a draft model
    for penalty in (1.0, 1.3):
        params = GenerationParams(max_tokens=20, greedy=True, stop_at_eos=False, repetition_penalty=penalty)
        plain = Generator(e).generate(ids, params)
        same = Generator(e, model_draft, SpecConfig(mode="chain", chain_len=4, adaptive=False)).generate(ids, params)
        assert same.tokens == plain.tokens
        if penalty == 1.0:  # the draft drafts exactly the target's tokens: every draft is accepted
            assert set(same.accepted) == {5}
    adaptive = Generator(e, EagleDraft(art[0] / "draft", e), SpecConfig(mode="tree")).generate(ids, params)
    assert adaptive.tokens == plain.tokens
    assert list(tmp_path.glob("spec-profile-*.json"))  # the measured costs are cached per library and device


def test_top_p_reference_by_hand():
    np.testing.assert_allclose(top_p_reference([0.1, 0.5, 0.2, 0.2], 0.6), [0, 5 / 7, 2 / 7, 0])  # tie: id 2 first
    np.testing.assert_allclose(top_p_reference([0.1, 0.5, 0.2, 0.2], 0.5), [0, 1, 0, 0])  # mass reached exactly
    np.testing.assert_allclose(top_p_reference([0.3, 0.7], 0.0), [0, 1])  # the top token always
    np.testing.assert_allclose(sampling_probs(np.log([0.3, 0.7]), 1.0, 0.0), [0, 1])  # the PyTorch path's filter


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 12).flatmap(lambda v: st.lists(st.lists(st.integers(0, 4), min_size=v, max_size=v).filter(any),
                                                     min_size=1, max_size=3)), st.data())
def test_top_p_filter_matches_brute_force(weights, data):
    """Distributions with ties and zeros (small integer weights); top_p anywhere in [0, 1] or exactly on a prefix
    mass of the first row (the boundary: that prefix is kept, nothing more)."""
    w = np.asarray(weights, dtype=np.float64)
    p = w / w.sum(-1, keepdims=True)
    masses, acc = [], 0.0
    for x in sorted(p[0], reverse=True):
        acc += x
        masses.append(acc)
    top_p = data.draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 0.5, 1.0] + masses)), label="top_p")
    got = top_p_filter(p, top_p)
    np.testing.assert_allclose(got, top_p_reference(p, top_p), rtol=1e-12, atol=0)
    assert np.all(got[np.arange(len(p)), np.argmax(p, -1)] > 0)


def _first_token_distribution(e, gen, prompt, params, trials):
    """Empirical distribution of the first token a speculative round emits after a fixed root."""
    rng = np.random.default_rng(123)
    root = int(np.argmax(e.prefill(0, prompt)))
    counts = np.zeros(e.cfg.vocab_size)
    for _ in range(trials):
        gen.drafter.begin(prompt, root, e.prefill_hidden(1, prompt) if gen.drafter.kind == "eagle" else None)
        res = type("R", (), {"tokens": [root], "accepted": [], "verify_sizes": []})()
        new = gen._spec_round(root, gen.spec.mode, 3 if gen.spec.mode == "chain" else 15, res, params, rng)
        counts[new[0]] += 1
        e.popn(0, len(new))  # root + accepted drafts were committed; the bonus was not
        e.popn(1, e.state.lengths[1])
    return counts / trials


@pytest.mark.parametrize("draft,mode", [("eagle", "chain"), ("eagle", "tree"), ("model", "chain")])
def test_sampling_keeps_the_target_distribution(art, engines, draft, mode):
    """Total-variation distance between the emitted token's empirical distribution (800 rounds) and the exact
    target distribution (temperature 0.4, top-p 0.6: ~20 tokens) stays below 0.15; iid sampling noise at this size
    is ~0.07, and emitting the (random) EAGLE draft's proposals unchecked would be far off."""
    e = engines["auto"]
    prompt = _ids(e, PROMPTS[2])
    params = GenerationParams(temperature=0.4, top_p=0.6)
    drafter = ModelDraft(engines["dense"], e) if draft == "model" else EagleDraft(art[0] / "draft", e)
    gen = Generator(e, drafter, SpecConfig(mode=mode, adaptive=False, chain_len=3, tree_size=16))
    e.reset()
    e.add_sequence(0)
    e.add_sequence(1)
    emp = _first_token_distribution(e, gen, prompt, params, trials=800)
    root = int(np.argmax(e.prefill(1, prompt)))
    z = e.decode(1, root).astype(np.float64) / params.temperature  # independent of the library's softmax/top-p
    p = np.exp(z - z.max())
    exact = top_p_reference(p / p.sum(), params.top_p)
    e.reset()
    tv = 0.5 * np.abs(emp - exact).sum()
    assert tv < 0.15, tv


def test_debug_counts_report_the_routers_measured_activity(art, engines):
    """A --debug-counts build returns, per layer and call, the union of active experts and the active
    (token, expert) pairs: equal to the PyTorch router's on the same tokens."""
    _, _, target = art
    e = engines["auto"]
    prompt = _ids(e, PROMPTS[0])
    chain = [int(t) for t in np.random.default_rng(5).integers(0, e.cfg.vocab_size, 6)]
    e.reset()
    e.add_sequence(0)
    e.prefill(0, prompt)
    e.collect_stats, e.stats_log = True, []
    try:
        e.batch_verify(0, chain, list(range(-1, len(chain) - 1)))
        e.commit_tree(0, -1)
        e.decode(0, chain[0])
    finally:
        e.collect_stats = False
        e.reset()
    verify, decode = e.stats_log
    assert verify["function"] == "batch_verify_with_stats" and verify["tokens"] == len(chain)
    with torch.no_grad():
        a0 = target(torch.tensor([prompt + chain])).router_logits
    for layer, logits in enumerate(a0):
        active = (logits[0, len(prompt):] > 0).numpy()
        assert verify["counts"][layer].tolist() == [int(active.any(0).sum()), int(active.sum())]
        assert decode["counts"][layer].tolist() == [int(active[0].sum()), int(active[0].sum())]
    obs = e.observed_sparsity()
    assert 0 <= obs["verify"]["tls"] <= 1 and obs["verify"]["mean_union"] >= obs["decode"]["mean_union"] - 1e-9


def test_errors_are_one_line(art, engines, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKFFN_CACHE", str(tmp_path / "cache"))
    out = art[0]
    e = engines["auto"]
    with pytest.raises(BlockFFNError, match="context window"):
        Generator(e).generate(list(range(600)), GenerationParams(max_tokens=8))
    # a draft model with another tokenizer
    other = tmp_path / "other"
    shutil.copytree(out, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    word = next(w for w in vocab if len(w) > 3)
    vocab[word[::-1] + "_x"] = vocab.pop(word)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(BlockFFNError, match="tokenizer"):
        ModelDraft(Engine(other), e)
    # a draft library built for another target
    manifest = json.loads((other / "draft" / "blockffn-draft.json").read_text())
    manifest["target"]["name"] = "jetson"
    (other / "draft" / "blockffn-draft.json").write_text(json.dumps(manifest))
    with pytest.raises(BlockFFNError, match="built for target jetson"):
        EagleDraft(other / "draft", e)
    from blockffn.artifacts.verify import verify_artifact

    assert any(line.startswith("draft     ok") for line in verify_artifact(out))
    with pytest.raises(BlockFFNError, match="draft built for target jetson"):
        verify_artifact(other)
    r = subprocess.run([sys.executable, "-m", "blockffn.cli", "generate", "--artifact", str(out), "--prompt",
                        "word " * 700, "--max-tokens", "4"], capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "context window" in r.stderr


def _read_until(fd, marker: bytes, timeout: float = 120) -> bytes:
    buf, end = b"", time.time() + timeout
    while marker not in buf:
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-400:]!r}")
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_chat_repl_in_a_pseudo_terminal(art, tmp_path):
    out = art[0]
    pid, fd = pty.fork()
    if pid == 0:  # child: the REPL on the pty
        os.execve(sys.executable, [sys.executable, "-m", "blockffn.cli", "chat", "--artifact", str(out),
                                   "--max-tokens", "400", "--greedy"], {**os.environ, "BLOCKFFN_CACHE": str(tmp_path)})
    try:
        _read_until(fd, b">>> ")
        os.write(fd, b"The President said that\n")
        _read_until(fd, b"that\r\n")  # the terminal's echo of the line
        reply = _read_until(fd, b">>> ")
        assert len(reply.replace(b">>> ", b"").strip()) > 10
        os.write(fd, b"/stats\n")
        stats = _read_until(fd, b">>> ")
        assert b"tok/s" in stats and b"last reply" in stats
        os.write(fd, b"Once upon a time\n")
        _read_until(fd, b"time\r\n")
        _read_until(fd, b" ", timeout=60)  # the reply has started streaming
        os.write(fd, b"\x03")  # Ctrl-C: the terminal sends SIGINT
        stopped = _read_until(fd, b">>> ")
        assert b"[stopped]" in stopped
        os.write(fd, b"/exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_prefill_choice_interpolates_measured_costs():
    choice = PrefillChoice({"sparse": {"16": 1.0, "128": 5.0}, "dense": {"16": 2.0, "128": 4.0}})
    assert not choice.dense(16) and not choice.dense(60)  # the lines cross at 72 tokens
    assert choice.dense(90) and choice.dense(128) and choice.dense(500)


def test_prefill_runs_chunked_union_or_dense_whichever_measured_faster(art, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKFFN_CACHE", str(tmp_path))
    out = art[0]
    engines_ = {ffn: Engine(out, ffn=ffn) for ffn in ("sparse", "dense", "auto")}
    ids = _ids(engines_["sparse"], " ".join(PROMPTS * 4))  # several 16-token union chunks
    assert len(ids) > 40
    logits = {}
    for ffn, e in engines_.items():
        e.add_sequence(0)
        logits[ffn] = e.prefill(0, ids)
        e.reset()
    scale = np.abs(logits["dense"]).max()
    assert np.abs(logits["sparse"] - logits["dense"]).max() / scale <= 1e-5
    assert np.abs(logits["auto"] - logits["dense"]).max() / scale <= 1e-5
    auto = engines_["auto"]
    choice = auto._prefill_choice
    assert choice is not None and list(tmp_path.glob("prefill-choice-*.json"))  # measured once, cached
    assert set(choice.summary()) == {16, 64}  # calibration lengths, capped by the artifact's prefill chunk
    # the function run per length follows the costs: hand-set ones whose lines cross at 28 tokens
    auto._prefill_choice = PrefillChoice({"sparse": {"16": 1.0, "64": 7.0}, "dense": {"16": 2.0, "64": 4.0}})
    assert [auto.prefill_function("prefill", n) for n in (8, 20, 30, len(ids))] == \
        ["prefill", "prefill", "prefill_dense", "prefill_dense"]
    assert engines_["sparse"].prefill_function("prefill", len(ids)) == "prefill"
    params = GenerationParams(max_tokens=16, greedy=True, stop_at_eos=False)
    tokens = {ffn: Generator(e).generate(ids, params).tokens for ffn, e in engines_.items()}
    assert tokens["sparse"] == tokens["dense"] == tokens["auto"]


def test_prefill_choice_waits_for_a_free_slot_and_replaces_a_stale_cache(art, tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKFFN_CACHE", str(tmp_path))
    e = Engine(art[0])
    for sid in range(e.max_batch):  # every slot taken: no scratch sequence to measure with, try again later
        e.add_sequence(sid)
    e.measure_prefill_choice()
    assert e._prefill_choice is False and not list(tmp_path.glob("prefill-choice-*.json"))
    e.remove_sequence(0)
    e.measure_prefill_choice()
    assert e._prefill_choice is not None and e.state.lengths.keys() == set(range(1, e.max_batch))
    (entry,) = tmp_path.glob("prefill-choice-*.json")
    entry.write_text('{"something": "else"}')  # an entry of another format is measured again and replaced
    again = Engine(art[0])
    again.measure_prefill_choice()
    assert again._prefill_choice is not None and "sparse" in json.loads(entry.read_text())
