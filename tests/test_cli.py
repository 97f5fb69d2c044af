"""The command line: help everywhere, JSON outputs on the bundled model, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from blockffn import default_model_path
from blockffn.cli import cli as click_group

HELDOUT = default_model_path().parent / "heldout.txt.xz"


def run(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "blockffn.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def all_commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path", [()] + list(all_commands(click_group)), ids=lambda p: " ".join(p) or "blockffn")
def test_help(path):
    r = run(*path, "--help")
    assert "Usage:" in r.stdout


def test_bundled_model_exists_and_is_small():
    folder = default_model_path()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert (folder / "config.json").exists() and (folder / "MODEL_CARD.md").exists()
    assert size <= 25 * 2**20


def test_eval_json_on_bundled_model():
    r = run("eval", "--text", HELDOUT, "--max-tokens", 4096, "--json")
    out = json.loads(r.stdout)
    assert {"ppl", "bpb", "tls", "cls", "reuse"} <= out.keys()
    assert set(out["cls"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert 1 < out["ppl"] < 4096 and 0 < out["bpb"] < 8
    assert 0 < out["tls"] < 1 and out["cls"]["1"] == pytest.approx(out["tls"], abs=0.02)
    assert out["cls"]["8"] <= out["cls"]["1"]


def test_bundled_model_meets_its_sparsity_goals():
    """The card's goals on a held-out prefix: sparse and chunk-sparse overall, and every layer routes per token
    (several experts a token, not the same set for every token: a BlockFFN, not a static MoE)."""
    out = json.loads(run("eval", "--text", HELDOUT, "--max-tokens", 16384, "--json").stdout)
    assert out["tls"] >= 0.8 and out["cls"]["8"] >= 0.7
    layers = out["per_layer"]
    assert min(layers["tls"]) >= 0.6 and max(layers["reuse"]) <= 0.95 and min(layers["active"]) >= 2, layers


def test_eval_sparse_matches_dense():
    dense = json.loads(run("eval", "--text", HELDOUT, "--max-tokens", 1024, "--json").stdout)
    sparse = json.loads(run("eval", "--text", HELDOUT, "--max-tokens", 1024, "--json", "--sparse").stdout)
    assert sparse["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)
    assert sparse["tls"] == pytest.approx(dense["tls"], abs=1e-3)


def test_generate_json_greedy_dense_and_sparse_equal_a_full_recompute_argmax():
    """Reference: argmax of a full forward over prompt + tokens so far at every step (no KV cache, dense FFN)."""
    from blockffn.data.prepare import load_tokenizer
    from blockffn.model import load_model

    model, tok = load_model(default_model_path()), load_tokenizer(default_model_path())
    ids, ref = tok.encode("The ship").ids, []
    with torch.no_grad():
        while len(ref) < 12 and (not ref or ref[-1] != model.config.eos_token_id):
            ref.append(int(model(torch.tensor([ids + ref])).logits[0, -1].argmax()))
    for extra in ((), ("--sparse",)):
        out = json.loads(run("generate", "--prompt", "The ship", "--max-tokens", 12, "--greedy", "--json",
                             *extra).stdout)
        assert out["tokens"] == ref, extra
        assert out["text"] == tok.decode(ref)


def test_init_presets(tmp_path):
    run("init", "--preset", "small", "--layers", 1, "--vocab-size", 512, "--output", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_experts"], cfg["expert_size"], cfg["q_lora_rank"]) == (768, 48, 64, 768)
    run("init", "--preset", "tiny-gqa", "--layers", 1, "--output", tmp_path / "g", "--shard-size-mb", 1)
    assert (tmp_path / "g" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("args,needle", [
    (("eval", "--text", "/nonexistent.txt"), "no such file"),
    (("eval", "--model", "/nonexistent", "--text", "x"), "not a model folder"),
    (("init", "--preset", "huge", "--output", "never-written"), "unknown preset"),
    (("generate", "--prompt", "x", "--max-tokens", 0), "--max-tokens"),
])
def test_errors_are_one_line(args, needle):
    r = run(*args, check=False)
    assert r.returncode != 0 and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_compiled_cache_follows_the_bundled_weights(tmp_path, monkeypatch):
    """chat/bench compile the bundled model once into the user cache; new weights under the same package version
    must get a new cache entry, never the library compiled for the old ones."""
    import hashlib

    import blockffn

    bundled = blockffn.default_model_path()
    names = ("config.json", "model.safetensors")
    digest = hashlib.sha256(b"".join((bundled / n).read_bytes() for n in names)).hexdigest()[:12]
    assert digest in blockffn.default_artifact_path("cpu").name
    other = tmp_path / "m"
    other.mkdir()
    (other / "config.json").write_bytes((bundled / "config.json").read_bytes())
    (other / "model.safetensors").write_bytes((bundled / "model.safetensors").read_bytes()[:-1] + b"!")
    monkeypatch.setattr(blockffn, "default_model_path", lambda: other)
    assert digest not in blockffn.default_artifact_path("cpu").name
