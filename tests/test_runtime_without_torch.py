"""The deployed runtime needs the TVM runtime, numpy and a tokenizer, not PyTorch: the artifact commands run in a
subprocess where ``import torch`` fails, on an artifact compiled here (with PyTorch) — and greedy generation there
prints exactly what it prints with PyTorch importable."""

import subprocess
import sys

import pytest


BLOCK_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch' (blocked: the runtime must not need it)", name="torch")
sys.meta_path.insert(0, _NoTorch())
"""
RUN_CLI = "from blockffn.cli import main; sys.argv[0] = 'blockffn'; main()"


def run(args, block: bool, stdin: str | None = None):
    code = (BLOCK_TORCH if block else "import sys\n") + RUN_CLI
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=600)


@pytest.fixture(scope="module")
def artifact(bundled_cpu_artifact):
    return bundled_cpu_artifact


def test_the_blocker_blocks():
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "blocked" in r.stderr


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "The President said that", "--max-tokens", "12", "--greedy"],
    ["inspect"],
    ["verify"],
])
def test_artifact_commands_run_without_torch(artifact, command):
    args = command[:1] + (["--artifact", artifact] if command[0] == "generate" else [artifact]) + command[1:]
    blocked = run(args, block=True)
    assert blocked.returncode == 0, blocked.stderr[-2000:]
    assert "Traceback" not in blocked.stderr
    if command[0] == "generate":  # the same greedy text either way
        free = run(args, block=False)
        assert free.returncode == 0, free.stderr[-2000:]
        assert blocked.stdout.splitlines()[:-1] == free.stdout.splitlines()[:-1]  # (last line: timing)
        assert blocked.stdout.strip()


def test_chat_and_bench_run_without_torch(artifact):
    chat = run(["chat", "--artifact", artifact, "--max-tokens", "8", "--greedy"], block=True,
               stdin="Hello there\n/exit\n")
    assert chat.returncode == 0, chat.stderr[-2000:]
    bench = run(["bench", "--artifact", artifact, "--max-tokens", "8"], block=True)
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "dense-AR" in bench.stdout


def test_model_commands_without_torch_say_which_extra_to_install():
    r = run(["init", "--preset", "tiny", "-o", "unused-output-dir"], block=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "pip install 'blockffn[compile]'" in r.stderr
