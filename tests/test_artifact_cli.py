"""blockffn-compile / generate --artifact / inspect through the CLI, and bad input that must fail cleanly."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from blockffn import default_model_path
from blockffn.model import load_model
from blockffn.runtime.engine import Engine
from tests.conftest import top_p_reference


def run(*args, check=True, entry="blockffn"):
    cmd = [sys.executable, "-c", f"import sys; from blockffn.cli import {'main' if entry == 'blockffn' else 'compile_main'}"
           f" as m; sys.argv[0] = '{entry}'; m()", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny-q0f32"
    r = run("--target", "cpu", "--output", out, "--context-window", 256, "--prefill-chunk", 64,
            entry="blockffn-compile")
    for phase in ("export", "passes", "build", "export_library", "weights"):
        assert phase in r.stdout
    assert "params" in r.stdout and "KV cache" in r.stdout and "temp decode" in r.stdout
    return out


def test_greedy_64_tokens_identical_pytorch_vs_artifact(artifact):
    prompt = "It was the best of times, it was the"
    a = json.loads(run("generate", "--prompt", prompt, "--max-tokens", 64, "--greedy", "--json").stdout)
    b = json.loads(run("generate", "--artifact", artifact, "--prompt", prompt, "--max-tokens", 64, "--greedy",
                       "--json").stdout)
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
    assert len(b["tokens"]) == 64 or b["tokens"][-1] == load_model(default_model_path()).config.eos_token_id


def test_sparse_and_dense_lowering_generate_the_same_tokens(artifact, tmp_path):
    dense = tmp_path / "dense"
    run("compile", "--ffn", "dense", "--output", dense, "--context-window", 256, "--prefill-chunk", 64)
    manifest = json.loads((artifact / "blockffn-manifest.json").read_text())
    from blockffn.compiler.compile import AUTO_SPARSE

    assert manifest["ffn"]["sparse_functions"] == list(AUTO_SPARSE)
    assert manifest["ffn"]["dense_twins"]["decode"] == "decode_dense"
    assert {"AddDenseTwins", "LowerBlockFFNSparse"} <= set(manifest["passes"])
    assert "LowerBlockFFNSparse" not in json.loads((dense / "blockffn-manifest.json").read_text())["passes"]
    prompt = "In the year of our Lord"
    a = json.loads(run("generate", "--artifact", dense, "--prompt", prompt, "--max-tokens", 64, "--greedy",
                       "--json").stdout)
    b = json.loads(run("generate", "--artifact", artifact, "--prompt", prompt, "--max-tokens", 64, "--greedy",
                       "--json").stdout)
    assert a["tokens"] == b["tokens"]


def sampled_reference(artifact, prompt, max_tokens, temperature, top_p, seed):
    """Tokens drawn from the artifact's logits with a numpy softmax(logits / T) and a brute-force nucleus, by inverse
    CDF on the uniforms of default_rng(seed) (one per token, as the runtime draws), stopping after EOS."""
    e = Engine(artifact)
    e.add_sequence(0)
    rng = np.random.default_rng(seed)
    logits, tokens = e.prefill(0, e.tokenizer.encode(prompt).ids), []
    while len(tokens) < max_tokens:
        z = logits.astype(np.float64) / temperature
        q = np.exp(z - z.max())
        c = np.cumsum(top_p_reference(q / q.sum(), top_p))
        tokens.append(int(np.argmax(c > rng.random() * c[-1])))
        if tokens[-1] == e.cfg.eos_token_id:
            break
        logits = e.decode(0, tokens[-1])
    return tokens


def test_sampling_is_seeded_and_follows_temperature_and_top_p(artifact):
    def sample(temperature, top_p):
        return json.loads(run("generate", "--artifact", artifact, "--prompt", "The sea", "--max-tokens", 16,
                              "--temperature", temperature, "--top-p", top_p, "--seed", 7, "--json").stdout)["tokens"]

    runs = {(t, p): sample(t, p) for t, p in ((0.9, 0.9), (1.6, 0.95), (0.9, 0.3))}
    for (t, p), tokens in runs.items():
        assert tokens == sampled_reference(artifact, "The sea", 16, t, p, 7), (t, p)
    assert sample(0.9, 0.9) == runs[0.9, 0.9]  # seeded
    assert len({tuple(t) for t in runs.values()}) == 3  # same seed, other settings: other tokens


@pytest.mark.parametrize("quantization", ["q0f16", "q0bf16"])
def test_half_precision_artifact_close_to_fp32(tmp_path, quantization):
    out = tmp_path / quantization
    run("compile", "--dtype", quantization, "--output", out, "--context-window", 128, "--prefill-chunk", 32)
    model = load_model(default_model_path())
    ids = list(np.random.default_rng(0).integers(0, model.config.vocab_size, 40))
    engine = Engine(out)
    engine.add_sequence(0)
    got = engine.prefill(0, ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 2e-2
    tok = int(np.argmax(got))
    got = engine.decode(0, tok)
    with torch.no_grad():
        ref = model(torch.tensor([ids + [tok]])).logits[0, -1].numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 2e-2


def test_inspect(artifact):
    r = run("inspect", artifact)
    for needle in ("target", "cpu", "passes", "prefill", "batch_verify", "kv_cache", "tvm 0.27"):
        assert needle in r.stdout
    info = json.loads(run("inspect", artifact, "--json").stdout)
    assert info["metadata"]["model_type"] == "blockffn"


def test_verify(artifact, broken):
    r = run("verify", artifact)
    assert "arch      ok" in r.stdout and "metadata  ok" in r.stdout and "verified" in r.stdout
    lib = next(broken.glob("*.so"))
    data = bytearray(lib.read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # claim aarch64 in the ELF header
    lib.write_bytes(bytes(data))
    one_line_failure(run("verify", broken, check=False), "sha256 differs")  # not the library compiled
    manifest = json.loads((broken / "blockffn-manifest.json").read_text())  # re-pinned: the arch check speaks
    manifest.update(library_sha256=hashlib.sha256(bytes(data)).hexdigest())
    (broken / "blockffn-manifest.json").write_text(json.dumps(manifest))
    one_line_failure(run("verify", broken, check=False), "needs x86_64")


def one_line_failure(r, needle):
    assert r.returncode != 0, r.stdout
    assert needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unknown_target_lists_valid_ones_and_writes_nothing(tmp_path):
    r = run("--target", "tpu", "--output", tmp_path / "x", check=False, entry="blockffn-compile")
    one_line_failure(r, "valid targets:")
    for name in ("cpu", "cuda", "jetson", "android", "metal", "iphone"):
        assert name in r.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())


def test_list_targets():
    out = run("--list-targets", entry="blockffn-compile").stdout
    for name in ("cpu", "cpu-aarch64", "cuda", "jetson", "android", "android-adreno", "android-mali", "metal",
                 "iphone"):
        assert name in out
    assert "aarch64-linux-gnu" in out and "sm_87" in out


def test_compile_failure_leaves_no_partial_folder(tmp_path):
    r = run("compile", "--output", tmp_path / "x", "--context-window", 100000, check=False)
    one_line_failure(r, "--context-window")
    assert not list(tmp_path.iterdir())


@pytest.fixture
def broken(artifact, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _shard(folder):
    return next(folder.glob("params_shard_*.bin"))


@pytest.mark.parametrize("damage,needle", [
    (lambda d: _shard(d).unlink(), "weight shard missing"),
    (lambda d: _shard(d).write_bytes(_shard(d).read_bytes()[:-100]), "truncated"),
    (lambda d: _shard(d).write_bytes(bytes([_shard(d).read_bytes()[0] ^ 1]) + _shard(d).read_bytes()[1:]),
     "md5 mismatch"),
    (lambda d: (d / "blockffn-manifest.json").write_text(
        (d / "blockffn-manifest.json").read_text().replace('"tvm": "0.27.0.post1"', '"tvm": "0.26.0"')),
     "built with tvm 0.26.0"),
    (lambda d: (d / "mlc-chat-config.json").write_text("{not json"), "malformed JSON"),
])
def test_damaged_artifact_fails_with_one_line(broken, damage, needle):
    damage(broken)
    r = run("generate", "--artifact", broken, "--prompt", "hi", "--max-tokens", 4, check=False)
    one_line_failure(r, needle)


def test_prompt_longer_than_context_window(artifact):
    r = run("generate", "--artifact", artifact, "--prompt", "word " * 400, "--max-tokens", 4, check=False)
    one_line_failure(r, "context window")
