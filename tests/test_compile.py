"""Compiled model library (llvm) against the PyTorch model: every MLC function, trees, dtypes, artifact checks."""

import json

import numpy as np
import pytest
import torch

from blockffn import default_model_path
from blockffn.compiler.compile import CompileOptions, compile_model
from blockffn.model import BlockFFNForCausalLM, load_model, preset_config, save_model
from blockffn.runtime.engine import Engine


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def make_random_model(folder, kind):
    if kind == "mla":  # official Small shapes (heads, latent ranks, experts), 2 layers, small vocab
        cfg = preset_config("small", num_hidden_layers=2, vocab_size=1000)
    else:  # official 3B head and expert shapes (128-d heads, 128-wide experts), fewer of them
        cfg = preset_config("3b", num_hidden_layers=2, vocab_size=1000, hidden_size=512, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=16, intermediate_size=2048)
    save_model(BlockFFNForCausalLM(cfg).init_weights(seed=5), folder, dtype="float32")
    return folder


@pytest.fixture(scope="module", params=["bundled", "bundled-dense", "bundled-sparse", "mla", "gqa"])
def compiled(request, tmp_path_factory):
    """Artifacts under test: the bundled model with each --ffn policy, random official-shape MLA and GQA models
    (default policy: sparse decode / batch_decode / batch_verify, dense prefill)."""
    root = tmp_path_factory.mktemp(f"art-{request.param}")
    kind, _, ffn = request.param.partition("-")
    model_dir = default_model_path() if kind == "bundled" else make_random_model(root / "model", kind)
    out = root / "artifact"
    compile_model(CompileOptions(model_dir=model_dir, output=out, context_window=256, prefill_chunk=64,
                                 max_batch_size=4, ffn=ffn or "auto"))
    return load_model(model_dir), Engine(out), out


def test_prefill_and_decode_match_pytorch(compiled):
    model, engine, _ = compiled
    ids = list(np.random.default_rng(0).integers(0, model.config.vocab_size, 100))  # 2 prefill chunks of 64
    engine.add_sequence(0)
    got = engine.prefill(0, ids)
    assert rel_err(got, torch_logits(model, ids)[-1]) <= 1e-4
    for _ in range(3):
        tok = int(np.argmax(got))
        ids.append(tok)
        got = engine.decode(0, tok)
        assert rel_err(got, torch_logits(model, ids)[-1]) <= 1e-4
    engine.reset()


def test_batch_prefill_and_batch_decode_match_pytorch(compiled):
    model, engine, _ = compiled
    rng = np.random.default_rng(1)
    seqs = [list(rng.integers(0, model.config.vocab_size, n)) for n in (5, 9, 3)]
    for i in range(3):
        engine.add_sequence(i)
    got = engine.batch_prefill([0, 1, 2], seqs)
    for i, s in enumerate(seqs):
        assert rel_err(got[i], torch_logits(model, s)[-1]) <= 1e-4
    nxt = [int(np.argmax(g)) for g in got]
    got = engine.batch_decode([0, 1, 2], nxt)
    for i, s in enumerate(seqs):
        assert rel_err(got[i], torch_logits(model, s + [nxt[i]])[-1]) <= 1e-4
    engine.reset()


def tree_reference(model, prompt, tokens, parents):
    """PyTorch logits of every tree node: the prompt plus the node's ancestors, through an explicit mask."""
    n, p = len(tokens), len(prompt)
    depth = []
    for i in range(n):
        depth.append(1 if parents[i] < 0 else depth[parents[i]] + 1)
    mask = torch.zeros(1, 1, p + n, p + n, dtype=torch.bool)
    mask[0, 0, :p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    for i in range(n):
        mask[0, 0, p + i, :p] = True
        j = i
        while j >= 0:
            mask[0, 0, p + i, p + j] = True
            j = parents[j]
    positions = torch.tensor([list(range(p)) + [p - 1 + d for d in depth]])
    with torch.no_grad():
        out = model(torch.tensor([prompt + tokens]), positions=positions, mask=mask)
    return out.logits[0, p:].numpy()


def test_batch_verify_on_a_branching_tree(compiled):
    model, engine, _ = compiled
    rng = np.random.default_rng(2)
    prompt = list(rng.integers(0, model.config.vocab_size, 7))
    tokens = list(rng.integers(0, model.config.vocab_size, 6))
    parents = [-1, 0, 0, 1, -1, 4]  # two roots, a branch at node 0, chains below
    engine.add_sequence(0)
    engine.prefill(0, prompt)
    got = engine.batch_verify(0, tokens, parents)
    assert rel_err(got, tree_reference(model, prompt, tokens, parents)) <= 1e-4
    # keep the path 0 -> 1 -> 3, then decoding continues from it exactly as from a plain sequence
    engine.commit_tree(0, 3)
    assert engine.state.lengths[0] == len(prompt) + 3
    path = prompt + [tokens[0], tokens[1], tokens[3]]
    nxt = int(rng.integers(0, model.config.vocab_size))
    assert rel_err(engine.decode(0, nxt), torch_logits(model, path + [nxt])[-1]) <= 1e-4
    engine.reset()


def test_metadata_and_tensor_cache_agree(compiled):
    _, engine, out = compiled
    md = json.loads(str(engine.vm["_metadata"]()))
    for key in ("model_type", "quantization", "context_window_size", "prefill_chunk_size", "max_batch_size",
                "tensor_parallel_shards", "kv_cache", "params", "memory_usage", "tvm_version", "tvm_ffi_version",
                "blockffn_version", "target"):
        assert key in md, key
    assert md["model_type"] == "blockffn" and set(md["kv_cache"]) >= {"num_hidden_layers", "num_attention_heads",
                                                                      "num_key_value_heads", "head_dim"}
    for fn in ("prefill", "decode", "batch_prefill", "batch_decode", "batch_verify", "embed"):
        assert fn in md["memory_usage"]
    cache = json.loads((out / "tensor-cache.json").read_text())
    assert (out / "ndarray-cache.json").read_text() == (out / "tensor-cache.json").read_text()
    records = [r for shard in cache["records"] for r in shard["records"]]
    assert [(r["name"], r["shape"], r["dtype"]) for r in records] == \
        [(p["name"], p["shape"], p["dtype"]) for p in md["params"]]
    import hashlib

    for shard in cache["records"]:
        assert hashlib.md5((out / shard["dataPath"]).read_bytes()).hexdigest() == shard["md5sum"]
    chat = json.loads((out / "mlc-chat-config.json").read_text())
    for key in ("model_type", "quantization", "model_config", "vocab_size", "context_window_size",
                "sliding_window_size", "prefill_chunk_size", "attention_sink_size", "tensor_parallel_shards",
                "conv_template", "tokenizer_files"):
        assert key in chat, key
    assert isinstance(chat["conv_template"], dict) and 1 <= len(chat["conv_template"]["seps"]) <= 2
    functions = json.loads((out / "blockffn-manifest.json").read_text())["functions"]
    for fn in ("embed", "prefill", "decode", "batch_prefill", "batch_decode", "batch_verify",
               "create_tir_paged_kv_cache", "alloc_embedding_tensor", "softmax_with_temperature", "_metadata"):
        assert fn in functions, fn
    # the logit processors are TIR functions (MLC looks them up in the library, not in the VM's function list)
    for fn in ("apply_logit_bias_inplace", "apply_penalty_inplace", "apply_bitmask_inplace"):
        assert callable(engine.library_function(fn)), fn  # raises AttributeError when the library lacks it


def test_logit_functions_match_numpy(compiled):
    import tvm

    _, engine, _ = compiled
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 1, 50)).astype(np.float32)
    temp = np.array([0.7, 0.0], dtype=np.float32)
    probs = engine.vm["softmax_with_temperature"](tvm.runtime.tensor(logits), tvm.runtime.tensor(temp)).numpy()
    e = np.exp((logits[0, 0] - logits[0, 0].max()) / 0.7)
    np.testing.assert_allclose(probs[0, 0], e / e.sum(), rtol=1e-5, atol=1e-7)
    assert probs[1, 0].argmax() == logits[1, 0].argmax() and probs[1, 0].max() == pytest.approx(1.0)
    lg = rng.standard_normal((3, 40)).astype(np.float32)
    t = tvm.runtime.tensor(lg.copy())
    engine.library_function("apply_logit_bias_inplace")(t, tvm.runtime.tensor(np.array([0, 2], "int32")),
                                          tvm.runtime.tensor(np.array([5, 7], "int32")),
                                          tvm.runtime.tensor(np.array([1.5, -2.0], "float32")))
    ref = lg.copy()
    ref[0, 5] += 1.5
    ref[2, 7] -= 2.0
    np.testing.assert_allclose(t.numpy(), ref)
    t = tvm.runtime.tensor(lg.copy())
    pen = np.array([[0.1, 0.2, 1.3], [0.0, 0.5, 2.0]], "float32")
    engine.library_function("apply_penalty_inplace")(t, tvm.runtime.tensor(np.array([1, 2], "int32")),
                                       tvm.runtime.tensor(np.array([0, 1], "int32")),
                                       tvm.runtime.tensor(np.array([3, 4], "int32")),
                                       tvm.runtime.tensor(np.array([2, 1], "int32")), tvm.runtime.tensor(pen))
    ref = lg.copy()
    for (row, s, tok, cnt) in [(1, 0, 3, 2), (2, 1, 4, 1)]:
        v = ref[row, tok] - (pen[s, 0] + cnt * pen[s, 1])
        ref[row, tok] = v * pen[s, 2] if v < 0 else v / pen[s, 2]
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-6)
    t = tvm.runtime.tensor(lg.copy())
    mask = np.zeros((3, 2), "int32")
    mask[1, 0] = 0b1011
    engine.library_function("apply_bitmask_inplace")(t, tvm.runtime.tensor(np.array([1], "int32")), tvm.runtime.tensor(mask))
    out = t.numpy()
    assert np.all(out[1, [0, 1, 3]] == lg[1, [0, 1, 3]]) and np.all(out[1, [2] + list(range(4, 40))] < -1e30)
    assert np.array_equal(out[[0, 2]], lg[[0, 2]])
