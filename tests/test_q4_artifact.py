"""q4 artifacts of the bundled model (CPU): logits against fp32 and fake-quantized PyTorch, perplexity and router
locality through the quantized weights, size, manifest, and the CLI (`compile --quantization`, `eval --artifact`)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from blockffn import default_model_path
from blockffn.artifacts.reader import open_artifact
from blockffn.artifacts.verify import verify_artifact
from blockffn.compiler.compile import CompileOptions, compile_model
from blockffn.compiler.quantization import SCHEMES, fake_quantize_model
from blockffn.data.prepare import load_tokenizer, pack, read_documents
from blockffn.model import load_model
from blockffn.train.artifact_eval import artifact_window_nll, model_from_artifact, torch_window_nll
from blockffn.runtime.engine import Engine
from blockffn.train.evaluate import evaluate

HELDOUT = default_model_path().parent / "heldout.txt.xz"


@pytest.fixture(scope="module")
def heldout():
    tok = load_tokenizer(default_model_path())
    docs = read_documents(HELDOUT)
    return pack([e.ids for e in tok.encode_batch(docs)], load_model(default_model_path()).config.eos_token_id)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """q4f16_1 through the library API, q4f32_1 through the CLI's --quantization alias."""
    root = tmp_path_factory.mktemp("q4")
    compile_model(CompileOptions(model_dir=default_model_path(), output=root / "q4f16_1", quantization="q4f16_1",
                                 context_window=256, prefill_chunk=64, max_batch_size=2))
    r = subprocess.run([sys.executable, "-m", "blockffn.cli", "compile", "--quantization", "q4f32_1",
                        "--context-window", "256", "--prefill-chunk", "64", "--max-batch-size", "2",
                        "-o", str(root / "q4f32_1")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {"q4f16_1": root / "q4f16_1", "q4f32_1": root / "q4f32_1"}


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p_logits, q_logits) -> float:
    p, q = softmax(p_logits), softmax(q_logits)
    return float((p * (np.log(p) - np.log(q))).sum(-1).max())


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_logits_match_fake_quantized_pytorch_and_stay_close_to_fp32(artifacts, name):
    engine = Engine(artifacts[name])
    fp32 = load_model(default_model_path(), dtype="float32")
    fake = fake_quantize_model(load_model(default_model_path(), dtype="float32"), SCHEMES[name])
    ids = list(np.random.default_rng(0).integers(0, fp32.config.vocab_size, 70))  # 2 prefill chunks
    engine.add_sequence(0)
    got = [engine.prefill(0, ids)]
    for _ in range(2):  # sparse decode
        ids.append(int(np.argmax(got[-1])))
        got.append(engine.decode(0, ids[-1]))
    engine.reset()
    with torch.no_grad():
        ref_fake = fake(torch.tensor([ids])).logits[0, -3:].numpy()
        ref_fp32 = fp32(torch.tensor([ids])).logits[0, -3:].numpy()
    got = np.stack(got)
    tol = 1e-4 if name == "q4f32_1" else 1e-2  # fp16 activations on top of the same weights
    assert np.abs(got - ref_fake).max() / np.abs(ref_fake).max() <= tol
    max_abs, divergence = float(np.abs(got - ref_fp32).max()), kl(ref_fp32, got)
    print(f"{name}: vs fp32 max|Δlogit| {max_abs:.3f}, max KL(fp32‖q4) {divergence:.4f}")
    assert divergence <= 0.05 and max_abs < 0.2 * np.abs(ref_fp32).max()


def test_weights_are_the_fake_quantized_weights_and_bytes_shrink(artifacts):
    art = open_artifact(artifacts["q4f16_1"])
    rebuilt = model_from_artifact(art).state_dict()
    fake = fake_quantize_model(load_model(default_model_path(), dtype="float32"), SCHEMES["q4f16_1"])
    for name, w in fake.state_dict().items():
        if "router" in name or "norm" in name:  # full precision, stored as fp16
            assert torch.equal(rebuilt[name], w.half().float()), name
        else:
            assert torch.equal(rebuilt[name], w), name
    q4_bytes = sum(r["nbytes"] for s in art.tensor_cache["records"] for r in s["records"])
    q0f16_bytes = 2 * sum(w.numel() for w in fake.state_dict().values())  # every tensor as raw fp16
    print(f"q4f16_1 weights {q4_bytes} B = {q4_bytes / q0f16_bytes:.3f} × q0f16 ({q0f16_bytes} B)")
    assert q4_bytes <= 0.3 * q0f16_bytes


def test_manifest_records_the_scheme_and_mlc_names(artifacts):
    art = open_artifact(artifacts["q4f16_1"])
    m = art.manifest
    assert m["quantization"] == "q4f16_1" and m["quantization_scheme"]["group_size"] == 32
    assert m["quantization_scheme"]["scale_dtype"] == "float16"
    params = {p["name"]: p for p in m["params"]}
    assert params["model.layers.0.self_attn.o_proj.q_weight"]["dtype"] == "uint32"
    assert params["model.layers.0.self_attn.o_proj.q_scale"]["dtype"] == "float16"
    cfg = json.loads((default_model_path() / "config.json").read_text())  # down_proj: [E, d, De / 8 nibble words]
    assert params["model.layers.0.mlp.down_proj.q_weight"]["shape"] == [cfg["num_experts"], cfg["hidden_size"],
                                                                         cfg["expert_size"] // 8]
    assert params["model.layers.0.mlp.router_proj.weight"]["dtype"] == "float16"
    assert "model.layers.0.mlp.up_proj" not in params
    assert art.chat_config["quantization"] == "q4f16_1"
    assert any(line.startswith("metadata  ok") for line in verify_artifact(artifacts["q4f16_1"]))


def test_perplexity_through_the_q4_artifact_rises_at_most_5_percent(artifacts, heldout):
    fp32 = load_model(default_model_path(), dtype="float32")
    ref = torch_window_nll(fp32, heldout.tokens, 128, 512)
    run = artifact_window_nll(Engine(artifacts["q4f32_1"]), heldout.tokens, 128, 512)  # the library itself
    rebuilt = torch_window_nll(model_from_artifact(open_artifact(artifacts["q4f16_1"])), heldout.tokens, 128, 8192)
    ref_long = torch_window_nll(fp32, heldout.tokens, 128, 8192)
    print(f"ppl fp32 {ref['ppl']:.2f} q4f32_1 artifact {run['ppl']:.2f} ({run['tokens']} tokens); "
          f"fp32 {ref_long['ppl']:.2f} q4f16_1 weights {rebuilt['ppl']:.2f} ({rebuilt['tokens']} tokens)")
    assert run["tokens"] == ref["tokens"] == 512
    assert run["ppl"] <= 1.05 * ref["ppl"] and rebuilt["ppl"] <= 1.05 * ref_long["ppl"]


def test_router_locality_through_the_q4_router_changes_at_most_0_02(artifacts, heldout):
    fp32 = evaluate(load_model(default_model_path(), dtype="float32"), heldout, 256, 8192)
    q4 = evaluate(model_from_artifact(open_artifact(artifacts["q4f16_1"])), heldout, 256, 8192)
    print(f"TLS {fp32['tls']:.4f} -> {q4['tls']:.4f}, CLS8 {fp32['cls']['8']:.4f} -> {q4['cls']['8']:.4f}")
    assert abs(q4["tls"] - fp32["tls"]) <= 0.02 and abs(q4["cls"]["8"] - fp32["cls"]["8"]) <= 0.02


def test_eval_cli_on_an_artifact(artifacts, tmp_path):
    text = tmp_path / "held.txt"
    text.write_text(" ".join(read_documents(HELDOUT)[:40]))
    r = subprocess.run([sys.executable, "-m", "blockffn.cli", "eval", "--artifact", str(artifacts["q4f32_1"]),
                        "--text", str(text), "--seq-len", "64", "--max-tokens", "128", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["quantization"] == "q4f32_1" and out["tokens"] == 128 and math.isfinite(out["ppl"])
    assert 0 <= out["tls"] <= 1 and "8" in out["cls"]
    bad = subprocess.run([sys.executable, "-m", "blockffn.cli", "eval", "--artifact", str(artifacts["q4f32_1"]),
                          "--quantization", "q4f16_1", "--text", str(text)], capture_output=True, text=True)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
