"""The aarch64 CPU build runs under qemu-aarch64 (aarch64 apache-tvm wheel, arm64 Python sysroot from
tools/build_qemu_sysroot.sh) and gives the x86 build's logits and greedy tokens for the same weights."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import blockffn.runtime.standalone as standalone
from blockffn import default_model_path
from blockffn.artifacts.verify import verify_artifact
from blockffn.compiler.compile import CompileOptions, compile_model
from blockffn.data.prepare import load_tokenizer
from blockffn.runtime.engine import Engine
from blockffn.targets import qemu

PROMPT_TEXT = ("The President said that the new law would be signed next week, after the committee had "
               "finished its work on the budget")
DECODE_STEPS = 4

pytestmark = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                reason="needs aarch64-linux-gnu-g++ (Debian g++-aarch64-linux-gnu) to link the .so")


def _compile(out: Path, target: str) -> Path:
    compile_model(CompileOptions(model_dir=default_model_path(), target=target, output=out, context_window=256,
                                 prefill_chunk=16))
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aarch64")
    return _compile(tmp / "x86", "cpu"), _compile(tmp / "arm", "cpu-aarch64")


def test_aarch64_artifact_verifies_as_arm_elf(artifacts):
    _, arm = artifacts
    report = "\n".join(verify_artifact(arm))
    assert "arch      ok: 1 object(s) aarch64" in report
    assert "manifest vs tensor-cache.json" in report  # not host-loadable: metadata from the manifest
    manifest = json.loads((arm / "blockffn-manifest.json").read_text())
    assert manifest["target"]["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert "standalone.py" in (arm / "DEPLOY.md").read_text()


def _x86_reference(folder: Path, prompt: list[int]):
    """Greedy prefill + decode through the product runtime (Engine) on this machine."""
    engine = Engine(folder)
    engine.add_sequence(0)
    prefill = engine.prefill(0, prompt)
    tokens, decode = [int(np.argmax(prefill))], []
    for _ in range(DECODE_STEPS):
        decode.append(engine.decode(0, tokens[-1]))
        tokens.append(int(np.argmax(decode[-1])))
    return prefill, np.stack(decode), tokens


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_aarch64_build_under_qemu_matches_x86_logits(artifacts, tmp_path):
    reason = qemu.unavailable_reason()
    if reason:
        pytest.skip(reason)
    x86, arm = artifacts
    # same weights: the tensor cache does not depend on the target
    assert (x86 / "tensor-cache.json").read_text() == (arm / "tensor-cache.json").read_text()
    prompt = load_tokenizer(x86).encode(PROMPT_TEXT).ids
    assert len(prompt) > 16  # two prefill chunks
    out = tmp_path / "qemu.npz"
    r = qemu.run_python(standalone.__file__, [str(arm), "--tokens", ",".join(map(str, prompt)), "--steps",
                                              str(DECODE_STEPS), "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    timings = json.loads(r.stdout.strip().splitlines()[-1])
    assert timings["machine"] == "aarch64"
    print("qemu-aarch64 timings:", timings)
    got = np.load(out)
    prefill, decode, tokens = _x86_reference(x86, prompt)
    assert _rel(got["prefill_logits"], prefill) <= 1e-4
    assert _rel(got["decode_logits"], decode) <= 1e-4
    assert got["tokens"].tolist() == tokens
