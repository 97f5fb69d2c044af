"""Trainer end to end through the CLI: data prepare, loss goes down, resume, and a 2-process torchrun on CPU."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from blockffn.model import load_model

TINY = {"attention_type": "mla", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "num_experts": 4, "expert_size": 32, "vocab_size": 320,
        "intermediate_size": 128, "router_act": "relu", "norm_after_router": "rms", "ffn_type": "block_linear",
        "bos_token_id": 0, "eos_token_id": 0, "max_position_embeddings": 256}


def run(*args, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=full_env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A synthetic corpus with learnable structure (a small grammar), written as .txt and .jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    subjects = ["the whale", "the captain", "a sailor", "the ship", "the sea"]
    verbs = ["sees", "follows", "fears", "loves", "finds"]
    objects = ["the harbour", "a storm", "the island", "the crew", "the light"]
    docs = [" ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(12))
            for _ in range(150)]
    (root / "a.txt").write_text("\n\n".join(docs[:100]) + "\n")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[100:]))
    (root / "config.json").write_text(json.dumps(TINY))
    data = root / "data"
    run("blockffn.cli", "data", "prepare", root / "a.txt", root / "b.jsonl", "--output", data,
        "--vocab-size", 320, "--val-fraction", 0.1)
    return root


def test_prepare_writes_packed_split(corpus):
    meta = json.loads((corpus / "data" / "meta.json").read_text())
    assert meta["sources"]["a.txt"]["val_docs"] == 10 and meta["sources"]["b.jsonl"]["val_docs"] == 5
    assert (corpus / "data" / "tokenizer.json").exists() and meta["val_tokens"] > 0


TRAIN_ARGS = ["--batch-size", 8, "--seq-len", 64, "--lr", 1e-2, "--chunk-len", 16, "--eval-every", 1000,
              "--eval-tokens", 2048, "--warmup-steps", 5, "--cs-stable-steps", 10, "--cs-adjust-every", 5]


def test_training_reduces_loss_and_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    run("blockffn.cli", "train", "--data", corpus / "data", "--output", out, "--config", corpus / "config.json",
        "--steps", 40, "--save-every", 20, *TRAIN_ARGS)
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    first = sum(h["lm"] for h in hist[:5]) / 5
    last = sum(h["lm"] for h in hist[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert all(h["al"] > 0 and h["cs"] > 0 for h in hist)
    summary = json.loads((out / "model" / "training_summary.json").read_text())
    assert summary["final_eval"]["ppl"] < 320 and 0 <= summary["final_eval"]["tls"] <= 1
    model = load_model(out / "model")  # the final model is a valid official-format folder
    assert model.config.num_hidden_layers == 2 and (out / "model" / "tokenizer.json").exists()
    # resume continues from the checkpoint's step and optimizer state
    r = run("blockffn.cli", "train", "--data", corpus / "data", "--output", out, "--steps", 45, *TRAIN_ARGS)
    assert "resuming" in r.stdout + r.stderr
    hist2 = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist2] == list(range(1, 46))  # appended to, not replaced


DDP_PROBE = """
import sys, torch
from blockffn.cli import main
from blockffn.train.trainer import Trainer

sample, train, seen = Trainer.sample_batch, Trainer.train, []

def sample_batch(self, step):
    batch = sample(self, step)
    seen.append(batch["input_ids"].clone())
    return batch

def train_and_dump(self):  # each rank: the windows it drew and its parameters after the last step
    result = train(self)
    torch.save({"inputs": seen, "params": {k: v.detach().clone() for k, v in self.model.state_dict().items()}},
               f"{self.tc.output_dir}/rank{self.rank}.pt")
    return result

Trainer.sample_batch, Trainer.train = sample_batch, train_and_dump
main(sys.argv[1:])
"""


def test_torchrun_two_processes_on_cpu(corpus, tmp_path):
    out = tmp_path / "ddp"
    (tmp_path / "probe.py").write_text(DDP_PROBE)
    run("torch.distributed.run", "--standalone", "--nproc_per_node", 2, tmp_path / "probe.py", "train",
        "--data", corpus / "data", "--output", out, "--config", corpus / "config.json", "--steps", 6,
        "--save-every", 0, *TRAIN_ARGS)
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 6
    state = json.loads((out / "model" / "training_summary.json").read_text())["state"]
    assert state["tokens"] == 6 * 8 * 64 * 2
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # the ranks drew different windows at every step ...
    assert len(r0["inputs"]) == len(r1["inputs"]) == 6
    assert all(a.shape == (8, 64) and not torch.equal(a, b) for a, b in zip(r0["inputs"], r1["inputs"]))
    # ... and DDP averaged the gradients: both end with the same parameters, the ones rank 0 saved
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"]), \
        [k for k in r0["params"] if not torch.equal(r0["params"][k], r1["params"][k])][:3]
    saved = load_model(out / "model", dtype="float32").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in r0["params"].items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without a GPU")
def test_train_on_cuda_without_a_gpu_is_refused_in_one_line(corpus, tmp_path):
    args = ["train", "--data", corpus / "data", "--output", tmp_path / "run", "--device", "cuda", "--steps", 1]
    r = subprocess.run([sys.executable, "-m", "blockffn.cli", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "--device cpu" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_cli_device_choices_are_the_trainers():
    from blockffn.cli.model_commands import TRAIN_DEVICES
    from blockffn.train.device import DEVICES

    assert TRAIN_DEVICES == DEVICES  # the CLI keeps its own copy so that it imports without torch
