"""Interop with the official BlockFFN code, proven by fixtures it produced (tools/official_fixtures.py).

official -> ours: checkpoints saved by the official ``MiniCPMForCausalLM`` (MLA and "vanilla" attention, tied and
untied heads, sharded bf16, fused qkv + 3-D experts) with its fp32 logits and greedy tokens; our PyTorch model and
the compiled CPU artifact must reproduce them.  ours -> official: the official code loaded what ``blockffn init``
writes (same bytes, checked by digest) and its logits are the reference for ours.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blockffn.compiler.compile import CompileOptions, compile_model
from blockffn.errors import ConfigError
from blockffn.model import BlockFFNConfig, load_model, preset_config
from blockffn.model.generate import SamplingParams, generate
from blockffn.runtime.engine import Engine

FIXTURES = Path(__file__).parent / "fixtures" / "official"
OFFICIAL_SAVED = ["mla-untied", "mla-tied", "vanilla-untied", "vanilla-tied-sharded-bf16", "vanilla-block3d-fusedqkv"]
OURS_LOADED_BY_OFFICIAL = ["ours-mla", "ours-vanilla"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "blockffn.cli", *map(str, args)], capture_output=True, text=True)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def golden(name):
    return dict(np.load(FIXTURES / name / "golden.npz"))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Fixture name -> a model folder: the official one as saved, or ours re-made by the recorded `init`."""
    dirs = {name: FIXTURES / name for name in OFFICIAL_SAVED}
    for name in OURS_LOADED_BY_OFFICIAL:
        g = golden(name)
        out = tmp_path_factory.mktemp(name) / "m"
        r = cli("init", *g["init_args"].tolist(), "-o", out)
        assert r.returncode == 0, r.stderr
        digest = hashlib.sha256((out / "config.json").read_bytes() + (out / "model.safetensors").read_bytes())
        assert digest.hexdigest() == str(g["init_sha256"]), (
            f"`blockffn init {' '.join(g['init_args'])}` no longer writes the checkpoint the official code was run "
            f"on; re-run tools/official_fixtures.py")
        dirs[name] = out
    return dirs


@pytest.mark.parametrize("name", OFFICIAL_SAVED + OURS_LOADED_BY_OFFICIAL)
def test_pytorch_model_reproduces_official_logits_and_greedy_tokens(model_dirs, name):
    g = golden(name)
    model = load_model(model_dirs[name])
    prompt = g["prompt"].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].numpy()
    assert rel_err(logits, g["logits"]) <= 1e-4
    out = generate(model, prompt, SamplingParams(greedy=True, max_tokens=len(g["greedy"]), stop_at_eos=False))
    assert out["tokens"] == g["greedy"].tolist()


@pytest.mark.parametrize("name", OFFICIAL_SAVED + OURS_LOADED_BY_OFFICIAL)
def test_compiled_cpu_artifact_reproduces_official_logits_and_greedy_tokens(model_dirs, tmp_path, name):
    g = golden(name)
    out = tmp_path / "artifact"
    compile_model(CompileOptions(model_dir=model_dirs[name], output=out, context_window=64, prefill_chunk=32,
                                 max_batch_size=1, draft="none"))
    engine = Engine(out)
    prompt = g["prompt"].tolist()
    engine.add_sequence(0)
    last = engine.prefill(0, prompt)
    assert rel_err(last, g["logits"][-1]) <= 1e-4
    tokens = []
    for _ in range(len(g["greedy"])):
        tokens.append(int(np.argmax(last)))
        last = engine.decode(0, tokens[-1])
    assert tokens == g["greedy"].tolist()


def test_official_vocabulary_is_written_and_older_gqa_is_read():
    raw = preset_config("3b").to_hf_dict()
    assert raw["attention_type"] == "vanilla"
    assert BlockFFNConfig.from_hf_dict(raw).attention_type == "vanilla"
    assert BlockFFNConfig.from_hf_dict({**raw, "attention_type": "gqa"}).to_hf_dict() == raw


def test_init_3b_writes_vanilla_and_loads_back(tmp_path):
    r = cli("init", "--preset", "3b", "--layers", "1", "--vocab-size", "256", "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["attention_type"] == "vanilla" and raw["intermediate_size"] == raw["num_experts"] * raw["expert_size"]
    assert load_model(tmp_path / "m", dtype="bfloat16").config.attention_type == "vanilla"


def test_official_keys_round_trip_through_convert(tmp_path):
    """Keys only the official code uses (moe_top_k, attention_dropout, ...) survive a convert untouched."""
    src = FIXTURES / "vanilla-untied"
    r = cli("convert", "--model", src, "-o", tmp_path / "c", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    before, after = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "c"))
    for key in ("moe_top_k", "moe_top_p", "moe_routing_strategy", "num_shared_experts", "attention_dropout",
                "use_cache", "pretraining_tp", "attention_bias"):
        assert after[key] == before[key], key


def official_raw(**edits):
    raw = json.loads((FIXTURES / "mla-untied" / "config.json").read_text())
    raw.update(edits)
    return {k: v for k, v in raw.items() if v is not ...}


def test_absent_keys_take_the_official_defaults():
    cfg = BlockFFNConfig.from_hf_dict(official_raw(tie_word_embeddings=..., rms_norm_eps=..., scale_emb=...,
                                                   expert_size=..., num_key_value_heads=...))
    assert cfg.tie_word_embeddings is True and cfg.rms_norm_eps == 1e-6 and cfg.scale_emb == 1
    assert cfg.expert_size == 128 and cfg.num_key_value_heads == cfg.num_attention_heads
    assert BlockFFNConfig.from_hf_dict(official_raw(attention_type=..., q_lora_rank=...)).attention_type == "vanilla"


@pytest.mark.parametrize("edits,key", [
    (dict(ffn_type=...), "ffn_type"),  # absent: the official default is a dense FFN
    (dict(norm_after_router="sum"), "norm_after_router"),
    (dict(block_implementation="megablocks"), "block_implementation"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(pretraining_tp=2), "pretraining_tp"),
    (dict(q_lora_rank=None), "q_lora_rank"),  # the official MLAAttention cannot build it either
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
])
def test_official_values_we_do_not_run_are_refused_naming_the_key(edits, key):
    with pytest.raises(ConfigError, match=key):
        BlockFFNConfig.from_hf_dict(official_raw(**edits))
