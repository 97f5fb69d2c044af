import os

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

from blockffn.model import BlockFFNForCausalLM, preset_config  # noqa: E402


def small_config(attention: str = "mla", **overrides):
    """A 2-layer model with the bundled model's head and expert shapes (fast enough for property tests)."""
    name = "tiny" if attention == "mla" else "tiny-gqa"
    overrides.setdefault("num_hidden_layers", 2)
    overrides.setdefault("vocab_size", 512)
    return preset_config(name, **overrides)


@pytest.fixture(params=["mla", "gqa"])
def attention(request):
    return request.param


@pytest.fixture
def small_model(attention):
    torch.manual_seed(0)
    return BlockFFNForCausalLM(small_config(attention)).init_weights(seed=1).eval()


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.fixture(scope="session")
def bundled_cpu_artifact(tmp_path_factory):
    """The bundled model compiled for this CPU (context 256) by `blockffn-compile`, in a subprocess; read-only
    (tests that change it work on a copy)."""
    import subprocess
    import sys

    from blockffn import default_model_path

    out = tmp_path_factory.mktemp("bundled-cpu") / "art"
    r = subprocess.run([sys.executable, "-c", "from blockffn.cli import compile_main; compile_main()",
                        "--model", default_model_path(), "--target", "cpu", "--context-window", "256",
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def top_p_reference(p, top_p):
    """Brute force nucleus filter: tokens by descending probability (ties: lower id first) until their mass reaches
    top_p, the most likely token always; the kept ones renormalised."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    for row, kept in zip(p.reshape(-1, p.shape[-1]), out.reshape(-1, p.shape[-1])):
        mass = 0.0
        for i in sorted(range(len(row)), key=lambda i: (-row[i], i)):
            kept[i] = row[i]
            mass += row[i]
            if mass >= top_p:
                break
        kept /= kept.sum()
    return out


@pytest.fixture(scope="module")
def sources(bundled_cpu_artifact, tmp_path_factory):
    """What the hostile-input tests copy into each case's workspace: the compiled CPU artifact, the bundled model
    and a small prepared data folder (tests/hostile_workspace.py)."""
    import subprocess
    import sys
    from pathlib import Path

    from blockffn import default_model_path
    from hostile_workspace import TEXT

    root = tmp_path_factory.mktemp("hostile-sources")
    (root / "corpus.txt").write_text(TEXT)
    r = subprocess.run([sys.executable, "-m", "blockffn.cli", "data", "prepare", str(root / "corpus.txt"), "-o",
                        str(root / "data"), "--vocab-size", "300"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {"art": bundled_cpu_artifact, "model": Path(default_model_path()), "data": root / "data"}
