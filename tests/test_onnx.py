"""ONNX: export (onnx.checker), ONNX Runtime against PyTorch, and the ONNX graph through our compiler against ONNX
Runtime.  References are independent: PyTorch's own forward for the exported graph, ONNX Runtime for our build of
it, numpy for hand-written BlockFFN graphs."""

import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from blockffn import default_model_path  # noqa: E402
from blockffn.model import BlockFFNForCausalLM, load_model, preset_config  # noqa: E402
from blockffn.model.onnx_export import export_onnx  # noqa: E402
from blockffn.runtime.onnx_runner import OnnxRuntimeLM  # noqa: E402

PROMPT = [5, 17, 99, 240, 13, 7, 1024, 33, 2, 610]
TOL = 1e-4  # fp32: max |a - b| / max |b|


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by full re-scoring (no cache): independent of every cache implementation under test."""
    out = []
    for _ in range(n):
        out.append(int(torch_logits(model, prompt + out)[-1].argmax()))
    return out


MODELS = {
    "bundled": lambda: load_model(default_model_path(), dtype="float32"),
    "tiny": lambda: BlockFFNForCausalLM(preset_config("tiny", num_hidden_layers=2)).init_weights(3),
    "tiny-gqa": lambda: BlockFFNForCausalLM(preset_config("tiny-gqa", num_hidden_layers=2)).init_weights(4),
}


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    model = MODELS[request.param]().eval()
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    export_onnx(model, path, with_past=True)
    return request.param, model, path


def test_export_is_valid_onnx_with_genai_io(exported):
    _, model, path = exported
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert {o.domain or "ai.onnx": o.version for o in m.opset_import}["ai.onnx"] >= 17
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*m.graph.input, *m.graph.output]}
    L = model.config.num_hidden_layers
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert dims["logits"] == ["batch_size", "sequence_length", model.config.vocab_size]
    for i in range(L):
        assert dims[f"past_key_values.{i}.key"][:3][::2] == ["batch_size", "past_sequence_length"]
        assert dims[f"present.{i}.value"][2] == "total_sequence_length"
    assert len(m.graph.input) == 3 + 2 * L and len(m.graph.output) == 1 + 2 * L


def test_onnxruntime_matches_pytorch(exported):
    """Prefill and cached decode logits within fp32 tolerance; 32 greedy tokens identical."""
    _, model, path = exported
    ort = OnnxRuntimeLM(path)
    logits, cache = ort.forward(np.asarray([PROMPT]), 0, ort.empty_cache())
    assert rel(logits[0], torch_logits(model, PROMPT)) <= TOL
    seq = list(PROMPT)
    for tok in (11, 400, 3):  # decode with the cache, one token at a time
        logits, cache = ort.forward(np.asarray([[tok]]), len(seq), cache)
        seq.append(tok)
        assert rel(logits[0, -1], torch_logits(model, seq)[-1]) <= TOL
    assert ort.greedy(PROMPT, 32).tokens == torch_greedy(model, PROMPT, 32)


def test_left_padding_matches_unpadded(exported):
    """A batch of two prompts of different lengths (left padding, GenAI positions) gives each prompt's logits."""
    _, model, path = exported
    ort = OnnxRuntimeLM(path)
    short = PROMPT[3:]
    pad = len(PROMPT) - len(short)
    ids = np.asarray([PROMPT, [0] * pad + short])
    mask = np.asarray([[1] * len(PROMPT), [0] * pad + [1] * len(short)])
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **ort.empty_cache(batch=2)}
    logits = ort.session.run(["logits"], feeds)[0]
    assert rel(logits[0], torch_logits(model, PROMPT)) <= TOL
    assert rel(logits[1, pad:], torch_logits(model, short)) <= TOL


def test_export_without_past_and_with_external_data(tmp_path):
    model = MODELS["tiny"]().eval()
    path = export_onnx(model, tmp_path / "m.onnx", with_past=False, external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > (tmp_path / "m.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no staging left behind
    ort = OnnxRuntimeLM(path)
    assert not ort.with_past
    logits, _ = ort.forward(np.asarray([PROMPT]), 0, None)
    assert rel(logits[0], torch_logits(model, PROMPT)) <= TOL
    assert ort.greedy(PROMPT, 6).tokens == torch_greedy(model, PROMPT, 6)


# ------------------------------------------------------------------------------------------ through our compiler
@pytest.fixture(scope="module")
def built(exported):
    from blockffn.compiler.onnx_import import build_onnx

    return build_onnx(exported[2], target="cpu", ffn="sparse", union_chunk=4)


def test_imported_graph_gets_sparse_twins(exported, built):
    L = exported[1].config.num_hidden_layers
    assert built.layers_outlined == L and built.layers_sparse == L and not built.unmatched
    assert any(f.startswith("BlockFFN") and "_sparse" in f for f in built.functions)


def test_compiled_onnx_matches_onnxruntime(exported, built):
    """Our build of the ONNX graph (union-sparse FFN) against ONNX Runtime on the same file: prefill over several
    union chunks, then cached decode steps."""
    import tvm
    from tvm import relax

    _, _, path = exported
    ort = OnnxRuntimeLM(path)
    vm = relax.VirtualMachine(built.executable, tvm.cpu())

    def run(ids, past_len, cache):
        feeds = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.ones((1, past_len + len(ids[0])),
                                                                                    np.int64),
                 "position_ids": np.arange(past_len, past_len + len(ids[0]))[None], **cache}
        out = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in built.input_names])
        names = [o.name for o in ort.session.get_outputs()]
        outs = [o.numpy() for o in out]
        return outs[0], {n.replace("present.", "past_key_values.", 1): v for n, v in zip(names[1:], outs[1:])}

    ours, cache = run([PROMPT], 0, ort.empty_cache())
    ref, ref_cache = ort.forward(np.asarray([PROMPT]), 0, ort.empty_cache())
    assert rel(ours, ref) <= TOL
    seq = list(PROMPT)
    for _ in range(6):
        tok = int(ref[0, -1].argmax())
        assert int(ours[0, -1].argmax()) == tok
        ours, cache = run([[tok]], len(seq), cache)
        ref, ref_cache = ort.forward(np.asarray([[tok]]), len(seq), ref_cache)
        seq.append(tok)
        assert rel(ours, ref) <= TOL
        for n in ref_cache:
            assert rel(cache[n], ref_cache[n]) <= TOL


# ------------------------------------------------------------------------------------------ CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "blockffn.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def test_cli_export_and_compile(tmp_path):
    model_dir = tmp_path / "tiny"
    assert _cli("init", "--preset", "tiny", "--layers", "2", "--dtype", "float32", "-o", model_dir).returncode == 0
    out = tmp_path / "m.onnx"
    r = _cli("export-onnx", "--model", model_dir, "-o", out, "--with-past")
    assert r.returncode == 0, r.stderr
    before = out.read_bytes()
    r = _cli("export-onnx", "--model", model_dir, "-o", out)
    assert r.returncode == 1 and "--overwrite" in r.stderr and out.read_bytes() == before
    r = _cli("compile-onnx", out, "-o", tmp_path / "m.so")
    assert r.returncode == 0, r.stderr
    assert "2 BlockFFN layers recognised, 2 lowered" in r.stdout and (tmp_path / "m.so").stat().st_size > 0


def test_cli_refuses_bad_onnx_inputs(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    r = _cli("compile-onnx", bad, "-o", tmp_path / "x.so")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a readable ONNX model" in r.stderr
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())])
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(plain))
    r = _cli("compile-onnx", plain, "-o", tmp_path / "x.so")
    assert r.returncode == 1 and "no BlockFFN layer recognised" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.so").exists()
    r = _cli("export-onnx", "-o", tmp_path / "m.txt")
    assert r.returncode == 1 and "must be a .onnx file" in r.stderr
