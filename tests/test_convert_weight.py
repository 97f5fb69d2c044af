"""MLC's split: `convert-weight` (streamed weights), `gen-config`, and a library built from the config alone.

The streamed weights must equal a full compile's byte for byte and, tensor by tensor, an independent in-memory
conversion of the PyTorch model; a library built alone plus converted weights must generate what a full compile
generates; a library and weights made for different --dtype must be refused in one line; and conversion must not
hold the model in memory.
"""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from blockffn import default_model_path
from blockffn.artifacts.weights import to_numpy
from blockffn.compiler.quantization import library_tensors, scheme_for
from blockffn.artifacts.layout import to_library_layout
from blockffn.model import BlockFFNForCausalLM, load_model, preset_config, save_model

PROMPT = "The President said that"


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "blockffn.cli", *map(str, args)], capture_output=True, text=True,
                          **kw)


def compile_cli(*args):
    return subprocess.run([sys.executable, "-c", "from blockffn.cli import compile_main; compile_main()",
                           *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory):
    """A 2-layer model of the bundled shape, bf16, in 5+ safetensors shards, with the bundled tokenizer."""
    folder = tmp_path_factory.mktemp("src") / "m"
    model = BlockFFNForCausalLM(preset_config("tiny", num_hidden_layers=2, vocab_size=4096)).init_weights(seed=3)
    save_model(model, folder, dtype="bfloat16", max_shard_bytes=600_000, tokenizer_dir=default_model_path())
    assert len(list(folder.glob("model-*.safetensors"))) >= 5
    return folder


def read_cache(folder):
    """{name: array} of an artifact's tensor cache, decoded from the raw shards."""
    import ml_dtypes

    cache = json.loads((folder / "tensor-cache.json").read_text())
    out = {}
    for shard in cache["records"]:
        data = (folder / shard["dataPath"]).read_bytes()
        for r in shard["records"]:
            dt = ml_dtypes.bfloat16 if r["dtype"] == "bfloat16" else np.dtype(r["dtype"])
            out[r["name"]] = np.frombuffer(data[r["byteOffset"]:r["byteOffset"] + r["nbytes"]], dtype=dt).reshape(
                r["shape"])
    return out


@pytest.mark.parametrize("quantization", ["q0f32", "q0f16", "q4f16_1"])
def test_convert_weight_equals_full_compile_and_in_memory_reference(sharded_bf16, tmp_path, quantization):
    conv, full = tmp_path / "conv", tmp_path / "full"
    r = cli("convert-weight", "--model", sharded_bf16, "--dtype", quantization, "-o", conv)
    assert r.returncode == 0, r.stderr
    r = compile_cli("--model", sharded_bf16, "--dtype", quantization, "-o", full, "--draft", "none",
                    "--context-window", 64)
    assert r.returncode == 0, r.stderr
    weight_files = sorted(p.name for p in conv.iterdir())
    assert "tensor-cache.json" in weight_files and "ndarray-cache.json" in weight_files
    assert "tokenizer.json" in weight_files
    for name in weight_files:
        assert (conv / name).read_bytes() == (full / name).read_bytes(), name
    # independent reference: the whole model in memory, converted as one state dict
    sd = load_model(sharded_bf16).state_dict()
    scheme = scheme_for(quantization)
    dtype = {"q0f32": "float32", "q0f16": "float16"}.get(quantization)
    expected = library_tensors(sd, load_model(sharded_bf16).config, scheme) if scheme else {
        n: to_numpy(to_library_layout(n, t), dtype) for n, t in sd.items()}
    got = read_cache(conv)
    assert set(got) == set(expected)
    for name, arr in expected.items():
        assert got[name].dtype == arr.dtype and np.array_equal(got[name], arr), name


@pytest.fixture(scope="module")
def split_artifact(tmp_path_factory):
    """The bundled model through the three commands (weights, config, library from config.json alone) and
    through one full compile."""
    root = tmp_path_factory.mktemp("split")
    art, lib = root / "art", root / "art" / "model.so"
    model = root / "config-only"
    model.mkdir()
    (model / "config.json").write_bytes((default_model_path() / "config.json").read_bytes())  # no weights
    r = compile_cli("--model", model, "-o", lib, "--context-window", 256)  # the library before the weights
    assert r.returncode == 0, r.stderr
    assert "peak RSS" in r.stdout
    for args in (("convert-weight",), ("gen-config", "--context-window", 256)):
        r = cli(*args, "-o", art)
        assert r.returncode == 0, r.stderr
    full = root / "full"
    r = compile_cli("-o", full, "--context-window", 256)
    assert r.returncode == 0, r.stderr
    return art, lib, full


def greedy(*args):
    r = cli("generate", *args, "--prompt", PROMPT, "--max-tokens", 24, "--greedy", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["tokens"]


def test_library_from_config_alone_generates_what_a_full_compile_does(split_artifact):
    art, lib, full = split_artifact
    assert greedy("--artifact", art, "--model-lib", lib) == greedy("--artifact", full)


def test_a_folder_of_weights_without_a_library_asks_for_one(split_artifact):
    art, _, _ = split_artifact
    r = cli("generate", "--artifact", art, "--prompt", PROMPT, "--max-tokens", 2)
    assert r.returncode != 0 and "--model-lib" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mismatched_library_and_weights_are_refused_in_one_line(split_artifact, tmp_path):
    _, lib, _ = split_artifact  # a q0f32 library
    q4 = tmp_path / "q4"
    for args in (("convert-weight", "--dtype", "q4f32_1"), ("gen-config", "--dtype", "q4f32_1")):
        assert cli(*args, "-o", q4).returncode == 0
    r = cli("generate", "--artifact", q4, "--model-lib", lib, "--prompt", PROMPT, "--max-tokens", 2)
    err = [line for line in r.stderr.splitlines() if "Warning" not in line]
    assert r.returncode != 0 and len(err) == 1 and "q4f32_1" in err[0] and "q0f32" in err[0]


def test_convert_weight_keeps_other_files_and_refuses_to_replace_weights(split_artifact, tmp_path):
    art = tmp_path / "art"  # a copy: the other tests keep using the shared artifact's q0f32 weights
    shutil.copytree(split_artifact[0], art)
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    r = cli("convert-weight", "--dtype", "q0f16", "-o", art)
    assert r.returncode != 0 and "--overwrite" in r.stderr
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    r = cli("convert-weight", "--dtype", "q0f16", "-o", art, "--overwrite")
    assert r.returncode == 0, r.stderr
    # the other files stay; the weight shards are replaced (q0f16 may need fewer shards: stale ones are removed)
    after = {p.name for p in art.iterdir()}
    shards = {n for n in set(before) | after if n.startswith("params_shard_")}
    assert after - shards == set(before) - shards and (art / "model.so").read_bytes() == before["model.so"]
    listed = {rec["dataPath"] for rec in json.loads((art / "tensor-cache.json").read_text())["records"]}
    assert after & shards == listed
    assert (art / "mlc-chat-config.json").read_bytes() == before["mlc-chat-config.json"]


def test_folder_output_needs_weights_and_a_config_is_required(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text((default_model_path() / "config.json").read_text())
    r = compile_cli("--model", tmp_path / "c", "-o", tmp_path / "out")
    assert r.returncode != 0 and "no model.safetensors" in r.stderr
    assert not (tmp_path / "out").exists()
    r = compile_cli("--model", tmp_path / "nothing", "-o", tmp_path / "x.so")
    assert r.returncode != 0 and "config.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1


MEASURE = textwrap.dedent("""
    import resource, subprocess, sys
    subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB, of the one child
""")


def peak_rss_kib(*cmd):
    r = subprocess.run([sys.executable, "-c", MEASURE, *map(str, cmd)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def test_convert_weight_streams_a_model_many_times_larger_than_its_memory_growth(tmp_path):
    """A 16-layer official-Small-shape model (≈ 480 MB in fp32) against the same model with 1 layer: the peak RSS
    of converting them may differ by a small fraction of the weights (loading the model whole adds ≥ 450 MB)."""
    peaks, sizes = [], []
    for layers in (1, 16):
        folder = tmp_path / f"m{layers}"
        r = cli("init", "--preset", "small", "--layers", layers, "--vocab-size", 4096, "--shard-size-mb", 64,
                "-o", folder)
        assert r.returncode == 0, r.stderr
        sizes.append(4 * sum(int(np.prod(s)) for s in _shapes(json.loads((folder / "config.json").read_text()))))
        peaks.append(peak_rss_kib(sys.executable, "-m", "blockffn.cli", "convert-weight", "--model", folder,
                                  "--dtype", "q0f32", "-o", tmp_path / f"out{layers}"))
    growth, more_weights = (peaks[1] - peaks[0]) * 1024, sizes[1] - sizes[0]
    assert more_weights > 400e6
    assert growth < more_weights / 8, (peaks, sizes)


def _shapes(cfg):
    from blockffn.model import BlockFFNConfig
    from blockffn.model.checkpoint import expected_shapes

    return expected_shapes(BlockFFNConfig.from_hf_dict(cfg)).values()


def test_bench_and_chat_run_a_library_built_alone(split_artifact, tmp_path):
    art, lib, _ = split_artifact
    (tmp_path / "prompts.txt").write_text("The President said that\n")
    r = cli("bench", "--artifact", art, "--model-lib", lib, "--prompts", tmp_path / "prompts.txt", "--max-tokens", 8,
            "--json", tmp_path / "bench.json")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["speedup_vs_dense_ar"]
    assert "sparse-AR" in rows
    r = cli("chat", "--artifact", art, "--model-lib", lib, "--max-tokens", 4, "--greedy", input="Hello\n/exit\n")
    assert r.returncode == 0, r.stderr
