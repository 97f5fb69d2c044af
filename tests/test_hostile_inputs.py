"""Hostile and careless inputs (issue 15): every case is one CLI run in a subprocess that must fail in one line
(exit 2 for a bad option value, 1 otherwise), without a traceback or a crash signal, and leave every file that
existed before it byte-identical.  Cases that read an artifact or model work on copies in their own tmp folder."""

from __future__ import annotations

import errno
import hashlib
import os
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from blockffn import default_model_path

TEXT = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(40))


class Workspace:
    """One case's folder; ``ws.art``/``ws.model``/``ws.data`` are private copies made on first use."""

    def __init__(self, root: Path, sources: dict[str, Path]):
        self.root, self.sources = root, sources

    def _copy(self, name: str) -> Path:
        dst = self.root / name
        if not dst.exists():
            shutil.copytree(self.sources[name], dst, symlinks=True)
        return dst

    art = property(lambda self: self._copy("art"))
    model = property(lambda self: self._copy("model"))
    data = property(lambda self: self._copy("data"))

    def file(self, name: str, content: str | bytes = TEXT) -> Path:
        f = self.root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        return f

    def unrelated(self, name: str = "mine") -> Path:
        """A folder of the user's own files (not a blockffn output)."""
        self.file(f"{name}/thesis.tex", "\\documentclass{article}")
        self.file(f"{name}/notes/todo.txt", "buy milk")
        return self.root / name


def _lib(art: Path) -> Path:
    return art / json.loads((art / "blockffn-manifest.json").read_text())["library"]


def _draft_lib(art: Path) -> Path:
    return next((art / "draft").glob("*.so"))


def _truncate(f: Path) -> Path:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _then(_effect, argv: list) -> list:
    """The arguments, after the workspace change written before them."""
    return argv


def _gen(art: Path, *extra) -> list:
    return ["generate", "--artifact", art, "--prompt", "Once upon a time", "--max-tokens", "4", *extra]


def _gen_pt(*extra) -> list:
    return ["generate", "--prompt", "Once upon a time", "--max-tokens", "4", *extra]


def _nan_weights(model: Path) -> Path:
    """Write a NaN into the first float tensor of a model's safetensors (the file stays well-formed)."""
    from safetensors.torch import load_file, save_file

    f = model / "model.safetensors"
    tensors = load_file(str(f))
    tensors[sorted(tensors)[0]].view(-1)[0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    return model


def _train(ws: Workspace, *extra, out: Path | None = None) -> list:
    return ["train", "--data", ws.data, "-o", out or ws.root / "run", "--steps", "2", "--batch-size", "2", "--seq-len",
            "16", "--eval-every", "2", "--eval-tokens", "64", "--layers", "1", *extra]


def _no_trainer_state(ws: Workspace) -> list:
    shutil.copytree(ws.model, ws.root / "run" / "checkpoint")
    return _train(ws)


def _train_draft(ws: Workspace, *extra) -> list:
    return ["train-draft", "--text", ws.file("t.txt"), "-o", ws.root / "draft", "--steps", "2", "--seq-len", "16",
            "--batch-size", "2", *extra]


@dataclass
class Case:
    argv: Callable[[Workspace], list]  # prepares the workspace, returns the arguments after `blockffn`
    rc: int = 1
    stdin: bytes | None = None


ART, PT = "artifact", "pytorch"
CASES: dict[str, Case] = {
    # integrity: a library that is not the one compiled (truncated: a bus error when mapped) or a draft's
    "truncated library: generate": Case(lambda ws: _then(_truncate(_lib(ws.art)), _gen(ws.art))),
    "truncated library: inspect": Case(lambda ws: _then(_truncate(_lib(ws.art)), ["inspect", ws.art])),
    "truncated library: verify": Case(lambda ws: _then(_truncate(_lib(ws.art)), ["verify", ws.art])),
    "truncated library: eval --artifact": Case(
        lambda ws: _then(_truncate(_lib(ws.art)), ["eval", "--artifact", ws.art, "--text", ws.file("t.txt")])),
    "truncated draft library: generate": Case(
        lambda ws: _then(_truncate(_draft_lib(ws.art)), _gen(ws.art, "--speculative", "chain"))),
    "truncated draft library: verify": Case(lambda ws: _then(_truncate(_draft_lib(ws.art)), ["verify", ws.art])),
    "another model's library: generate": Case(
        lambda ws: _then(shutil.copyfile(_draft_lib(ws.art), _lib(ws.art)), _gen(ws.art))),
    "library of same size, other bytes: inspect": Case(
        lambda ws: _then(_lib(ws.art).write_bytes(b"\0" * _lib(ws.art).stat().st_size), ["inspect", ws.art])),
    # malformed documents
    "manifest without target: generate": Case(
        lambda ws: _then(_edit(ws.art / "blockffn-manifest.json", lambda m: m.pop("target")), _gen(ws.art))),
    "manifest without target: inspect": Case(
        lambda ws: _then(_edit(ws.art / "blockffn-manifest.json", lambda m: m.pop("target")), ["inspect", ws.art])),
    "manifest without target: verify": Case(
        lambda ws: _then(_edit(ws.art / "blockffn-manifest.json", lambda m: m.pop("target")), ["verify", ws.art])),
    "manifest is a JSON list: verify": Case(
        lambda ws: _then((ws.art / "blockffn-manifest.json").write_text("[1, 2]"), ["verify", ws.art])),
    "draft manifest without hidden_size: generate": Case(
        lambda ws: _then(_edit(ws.art / "draft" / "blockffn-draft.json", lambda m: m.pop("hidden_size")),
                         _gen(ws.art, "--speculative", "chain"))),
    "draft token_map out of range: verify": Case(
        lambda ws: _then(_edit(ws.art / "draft" / "blockffn-draft.json", lambda m: m.update(
            token_map=[10**6] * m["draft_vocab_size"])), ["verify", ws.art])),
    "non-UTF-8 --stop: generate --artifact": Case(
        lambda ws: _gen(ws.art, "--stop", b"\xff"), rc=2),
    "manifest without versions: generate": Case(
        lambda ws: _then(_edit(ws.art / "blockffn-manifest.json", lambda m: m.pop("versions")), _gen(ws.art))),
    "chat config without model_config: chat": Case(
        lambda ws: _then(_edit(ws.art / "mlc-chat-config.json", lambda c: c.pop("model_config")),
                         ["chat", "--artifact", ws.art]), stdin=b"hello\n/exit\n"),
    "tensor cache missing a parameter: generate": Case(
        lambda ws: _then(_edit(ws.art / "tensor-cache.json", lambda d: d["records"][0]["records"].pop()),
                         _gen(ws.art))),
    "tensor cache is a list: generate": Case(
        lambda ws: _then((ws.art / "tensor-cache.json").write_text("[]"), _gen(ws.art))),
    "malformed tokenizer.json: generate --artifact": Case(
        lambda ws: _then((ws.art / "tokenizer.json").write_text('{"model": 3}'), _gen(ws.art))),
    "malformed tokenizer.json: generate --model": Case(
        lambda ws: _then((ws.model / "tokenizer.json").write_text("{"), _gen_pt("--model", ws.model))),
    "tie_word_embeddings 'yes': generate --model": Case(
        lambda ws: _then(_edit(ws.model / "config.json", lambda c: c.update(tie_word_embeddings="yes")),
                         _gen_pt("--model", ws.model))),
    "NaN weights: generate --model": Case(lambda ws: _gen_pt("--model", _nan_weights(ws.model))),
    "NaN weights: convert": Case(lambda ws: ["convert", "--model", _nan_weights(ws.model), "-o", ws.root / "out"]),
    # sampling options, both paths
    **{f"{flag} {value}: {path}": Case(
        (lambda ws, a=(flag, value), p=path: _gen(ws.art, *a) if p == ART else _gen_pt(*a)), rc=2)
       for path in (ART, PT)
       for flag, value in (("--top-p", "0"), ("--top-p", "nan"), ("--top-p", "1.5"), ("--temperature", "nan"),
                           ("--temperature", "inf"), ("--temperature", "-1"), ("--repetition-penalty", "nan"),
                           ("--repetition-penalty", "inf"), ("--seed", "-1"), ("--max-tokens", "-3"))},
    "--draft-len beyond the context: generate --artifact": Case(
        lambda ws: _gen(ws.art, "--speculative", "chain", "--draft-len", "100000"), rc=2),
    "--draft-len beyond the context: generate --model": Case(
        lambda ws: _gen_pt("--draft", Path(default_model_path()) / "draft", "--speculative", "chain",
                           "--draft-len", "100000"), rc=2),
    "non-UTF-8 prompt: generate --artifact": Case(
        lambda ws: ["generate", "--artifact", ws.art, "--prompt", b"caf\xe9 \xff", "--max-tokens", "2"], rc=2),
    "non-UTF-8 prompt: generate --model": Case(
        lambda ws: ["generate", "--prompt", b"caf\xe9 \xff", "--max-tokens", "2"], rc=2),
    "non-UTF-8 prompts file: bench": Case(
        lambda ws: ["bench", "--artifact", ws.art, "--prompts", ws.file("p.txt", b"caf\xe9\n\xff\xfe\n")]),
    "empty prompt: generate --artifact": Case(lambda ws: ["generate", "--artifact", ws.art, "--prompt", ""]),
    "prompt beyond the context: generate --artifact": Case(
        lambda ws: ["generate", "--artifact", ws.art, "--prompt", "word " * 400, "--max-tokens", "2"]),
    # compile
    "compile --context-window 0": Case(lambda ws: ["compile", "--context-window", "0", "-o", ws.root / "o"], rc=2),
    "compile --context-window -5": Case(lambda ws: ["compile", "--context-window", "-5", "-o", ws.root / "o"], rc=2),
    "compile --prefill-chunk 0": Case(lambda ws: ["compile", "--prefill-chunk", "0", "-o", ws.root / "o"], rc=2),
    "compile --union-chunk 0": Case(lambda ws: ["compile", "--union-chunk", "0", "-o", ws.root / "o"], rc=2),
    "compile --tune-trials -1": Case(lambda ws: ["compile", "--tune-trials", "-1", "-o", ws.root / "o"], rc=2),
    "compile -o naming a file": Case(lambda ws: ["compile", "--context-window", "64", "-o", ws.file("notes.txt")]),
    "compile --overwrite over unrelated files": Case(
        lambda ws: ["compile", "--context-window", "64", "--overwrite", "-o", ws.unrelated()]),
    "compile -o an existing artifact": Case(lambda ws: ["compile", "--context-window", "64", "-o", ws.art]),
    # init / convert
    "init --overwrite over unrelated files": Case(
        lambda ws: ["init", "--preset", "tiny", "--layers", "1", "--overwrite", "-o", ws.unrelated()]),
    "init -o naming a file": Case(lambda ws: ["init", "--preset", "tiny", "--layers", "1", "-o", ws.file("x.txt")]),
    "init --layers 0": Case(lambda ws: ["init", "--preset", "tiny", "--layers", "0", "-o", ws.root / "m"], rc=2),
    "init --vocab-size -1": Case(lambda ws: ["init", "--preset", "tiny", "--vocab-size", "-1", "-o", ws.root / "m"],
                                 rc=2),
    "init --shard-size-mb -1": Case(
        lambda ws: ["init", "--preset", "tiny", "--shard-size-mb", "-1", "-o", ws.root / "m"], rc=2),
    "init --force-active nan": Case(
        lambda ws: ["init", "--preset", "tiny", "--force-active", "nan", "-o", ws.root / "m"], rc=2),
    "init --seed -1": Case(lambda ws: ["init", "--preset", "tiny", "--seed", "-1", "-o", ws.root / "m"], rc=2),
    "convert in place": Case(lambda ws: ["convert", "--model", ws.model, "-o", ws.model, "--overwrite"]),
    "convert --overwrite over unrelated files": Case(
        lambda ws: ["convert", "--model", ws.model, "-o", ws.unrelated(), "--overwrite"]),
    "convert tie_word_embeddings 'yes'": Case(
        lambda ws: _then(_edit(ws.model / "config.json", lambda c: c.update(tie_word_embeddings="yes")),
                         ["convert", "--model", ws.model, "-o", ws.root / "o"])),
    "convert-weight -o naming a file": Case(lambda ws: ["convert-weight", "-o", ws.file("x.txt")]),
    "gen-config --context-window 0": Case(lambda ws: ["gen-config", "--context-window", "0", "-o", ws.root / "o"],
                                          rc=2),
    "gen-config -o naming a file": Case(lambda ws: ["gen-config", "-o", ws.file("x.txt")]),
    # data prepare
    "data prepare -o the input file": Case(lambda ws: ["data", "prepare", ws.file("c.txt"), "-o", ws.file("c.txt")]),
    "data prepare -o an existing data folder": Case(lambda ws: ["data", "prepare", ws.file("c.txt"), "-o", ws.data]),
    "data prepare --overwrite over unrelated files": Case(
        lambda ws: ["data", "prepare", ws.file("c.txt"), "-o", ws.unrelated(), "--overwrite"]),
    "data prepare --val-fraction nan": Case(
        lambda ws: ["data", "prepare", ws.file("c.txt"), "-o", ws.root / "d", "--val-fraction", "nan"], rc=2),
    "data prepare --vocab-size 0": Case(
        lambda ws: ["data", "prepare", ws.file("c.txt"), "-o", ws.root / "d", "--vocab-size", "0"], rc=2),
    "data prepare malformed tokenizer": Case(
        lambda ws: ["data", "prepare", ws.file("c.txt"), "-o", ws.root / "d", "--tokenizer",
                    ws.file("tok/tokenizer.json", "{").parent]),
    # train / train-draft
    "train --lr nan": Case(lambda ws: _train(ws, "--lr", "nan"), rc=2),
    "train --lr -1": Case(lambda ws: _train(ws, "--lr", "-1"), rc=2),
    "train --steps 0": Case(lambda ws: _train(ws, "--steps", "0"), rc=2),
    "train --seq-len 0": Case(lambda ws: _train(ws, "--seq-len", "0"), rc=2),
    "train --batch-size 0": Case(lambda ws: _train(ws, "--batch-size", "0"), rc=2),
    "train --eval-every 0": Case(lambda ws: _train(ws, "--eval-every", "0"), rc=2),
    "train --decay-frac nan": Case(lambda ws: _train(ws, "--decay-frac", "nan"), rc=2),
    "train --time-budget nan": Case(lambda ws: _train(ws, "--time-budget", "nan"), rc=2),
    "train --lambda-cs inf": Case(lambda ws: _train(ws, "--lambda-cs", "inf"), rc=2),
    "train --chunk-len 0": Case(lambda ws: _train(ws, "--chunk-len", "0"), rc=2),
    "train --seed -1": Case(lambda ws: _train(ws, "--seed", "-1"), rc=2),
    "train checkpoint without trainer state": Case(_no_trainer_state),
    "train-draft --lr nan": Case(lambda ws: _train_draft(ws, "--lr", "nan"), rc=2),
    "train-draft --seq-len 0": Case(lambda ws: _train_draft(ws, "--seq-len", "0"), rc=2),
    "train-draft -o naming a file": Case(
        lambda ws: ["train-draft", "--text", ws.file("t.txt"), "-o", ws.file("x.txt"), "--steps", "2"]),
    # eval / bench
    "eval --seq-len 0": Case(lambda ws: ["eval", "--text", ws.file("t.txt"), "--seq-len", "0"], rc=2),
    "eval --seq-len -1": Case(lambda ws: ["eval", "--text", ws.file("t.txt"), "--seq-len", "-1"], rc=2),
    "eval --max-tokens 0": Case(lambda ws: ["eval", "--text", ws.file("t.txt"), "--max-tokens", "0"], rc=2),
    "eval --artifact --seq-len 0": Case(
        lambda ws: ["eval", "--artifact", ws.art, "--text", ws.file("t.txt"), "--seq-len", "0"], rc=2),
    "bench --json to an unwritable path": Case(
        lambda ws: ["bench", "--artifact", ws.art, "--max-tokens", "4", "--json", ws.root / "no" / "such" / "o.json"],
        rc=2),
    "bench --json naming a folder": Case(
        lambda ws: ["bench", "--artifact", ws.art, "--max-tokens", "4", "--json", ws.unrelated()], rc=2),
    "bench --max-tokens 0": Case(lambda ws: ["bench", "--artifact", ws.art, "--max-tokens", "0"], rc=2),
    "bench --plot into a missing folder": Case(
        lambda ws: ["bench", "--artifact", ws.art, "--max-tokens", "4", "--plot", ws.root / "no" / "p.png"], rc=2),
    "bench --plot naming a folder": Case(lambda ws: ["bench", "--artifact", ws.art, "--plot", ws.unrelated()], rc=2),
    "eval text shorter than --seq-len": Case(lambda ws: ["eval", "--text", ws.file("s.txt", "A short text.")]),
    "eval --artifact text shorter than --seq-len": Case(
        lambda ws: ["eval", "--artifact", ws.art, "--text", ws.file("s.txt", "A short text."), "--seq-len", "64"]),
    "eval non-UTF-8 text": Case(lambda ws: ["eval", "--text", ws.file("s.txt", b"caf\xe9 " * 100)]),
    "chat --top-p nan": Case(lambda ws: ["chat", "--artifact", ws.art, "--top-p", "nan"], rc=2, stdin=b"hi\n"),
    "chat --draft-len beyond the context": Case(
        lambda ws: ["chat", "--artifact", ws.art, "--speculative", "chain", "--draft-len", "5000"], rc=2,
        stdin=b"hi\n"),
    "compile --overwrite over a model folder": Case(
        lambda ws: ["compile", "--context-window", "64", "--overwrite", "-o", ws.model]),
    "init --overwrite over an artifact": Case(
        lambda ws: ["init", "--preset", "tiny", "--layers", "1", "--overwrite", "-o", ws.art]),
    "data prepare --overwrite over a model folder": Case(
        lambda ws: ["data", "prepare", ws.file("c.txt"), "-o", ws.model, "--overwrite"]),
    "data prepare non-UTF-8 corpus": Case(
        lambda ws: ["data", "prepare", ws.file("c.txt", b"caf\xe9\n\n" * 10), "-o", ws.root / "d"]),
    "train --data not a data folder": Case(lambda ws: ["train", "--data", ws.unrelated(), "-o", ws.root / "run"]),
    "train -o naming a file": Case(lambda ws: _train(ws, out=ws.file("x.txt"))),
}


def run_case(case: Case, root: Path, sources: dict[str, Path]):
    """Prepare the case in ``root``, run it; returns (the process, files changed or removed)."""
    ws = Workspace(root, sources)
    argv = case.argv(ws)
    watched = [root, Path(default_model_path())]
    before = _hashes(watched)
    r = subprocess.run([sys.executable, "-m", "blockffn.cli", *map(_arg, argv)], capture_output=True,
                       input=case.stdin if case.stdin is not None else b"", timeout=300)
    after = _hashes(watched)
    return r, sorted(str(f) for f, h in before.items() if after.get(f) != h)


def _arg(a):
    return a if isinstance(a, bytes) else str(a)


def _hashes(folders) -> dict[Path, str]:
    return {f: hashlib.sha256(f.read_bytes()).hexdigest()
            for folder in folders for f in sorted(Path(folder).rglob("*")) if f.is_file() and not f.is_symlink()}


@pytest.fixture(scope="module")
def sources(bundled_cpu_artifact, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile-sources")
    (root / "corpus.txt").write_text(TEXT)
    r = subprocess.run([sys.executable, "-m", "blockffn.cli", "data", "prepare", str(root / "corpus.txt"), "-o",
                        str(root / "data"), "--vocab-size", "300"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {"art": bundled_cpu_artifact, "model": Path(default_model_path()), "data": root / "data"}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_fails_in_one_line_and_destroys_nothing(name, sources, tmp_path):
    case = CASES[name]
    r, changed = run_case(case, tmp_path, sources)
    err = r.stderr.decode(errors="replace")
    assert r.returncode >= 0, f"killed by signal {-r.returncode}"
    assert "Traceback" not in err, err
    assert r.returncode == case.rc, (r.returncode, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not changed, f"changed or removed: {changed}"


# ---------------------------------------------------------------------------------------------------------- behaviour
def _cli(*args, stdin: bytes = b""):
    return subprocess.run([sys.executable, "-m", "blockffn.cli", *map(_arg, args)], capture_output=True, input=stdin,
                          timeout=300)


def test_overwrite_replaces_an_output_of_its_own_kind(sources, tmp_path):
    ws = Workspace(tmp_path, sources)
    data = ws.data
    (data / "stale.txt").write_text("from the earlier run")
    r = _cli("data", "prepare", ws.file("c.txt"), "-o", data, "--overwrite", "--vocab-size", "280")
    assert r.returncode == 0, r.stderr
    assert json.loads((data / "meta.json").read_text())["vocab_size"] <= 280 and not (data / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_a_live_claim_refuses_a_second_writer_and_a_dead_one_is_cleaned(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / ".blockffn-claim").write_text(str(os.getpid()))  # this test process: alive, "writing" m
    r = _cli("init", "--preset", "tiny", "--layers", "1", "-o", out)
    assert r.returncode == 1 and b"being written by another blockffn process" in r.stderr, r.stderr
    assert [p.name for p in out.iterdir()] == [".blockffn-claim"]
    dead = _dead_pid()
    (out / ".blockffn-claim").write_text(str(dead))
    leftover = tmp_path / f".m.tmp-{dead}-abc"
    (leftover / "sub").mkdir(parents=True)
    r = _cli("init", "--preset", "tiny", "--layers", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    assert not leftover.exists() and b"killed run" in r.stderr
    assert (out / "config.json").exists() and not (out / ".blockffn-claim").exists()


def test_of_two_concurrent_writers_exactly_one_succeeds(tmp_path):
    out = tmp_path / "m"
    argv = [sys.executable, "-m", "blockffn.cli", "init", "--preset", "tiny", "--layers", "1", "-o", str(out)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert len(loser.strip().splitlines()) == 1 and ("being written" in loser or "not empty" in loser), loser
    assert (out / "config.json").exists() and not (out / ".blockffn-claim").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left by either


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_chat_survives_non_utf8_input(sources, tmp_path):
    ws = Workspace(tmp_path, sources)
    r = _cli("chat", "--artifact", ws.art, "--speculative", "off", "--max-tokens", "3", "--greedy",
             stdin=b"caf\xe9 \xff\n/stats\n/exit\n")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert b"last reply: 3 tokens" in r.stdout, r.stdout  # the reply to the undecodable line, then /stats


def test_inspect_shows_a_gpu_artifact_without_loading_its_library(sources, tmp_path):
    ws = Workspace(tmp_path, sources)
    _edit(ws.art / "blockffn-manifest.json", lambda m: m.update(target={
        "name": "cuda", "device": "cuda", "tvm_target": {"kind": "cuda", "arch": "sm_90"},
        "host_triple": "x86_64-linux-gnu"}))
    r = _cli("inspect", ws.art)
    assert r.returncode == 0, r.stderr
    assert b"target     cuda" in r.stdout and b"kv_cache" in r.stdout


def test_rerunning_a_finished_training_run_keeps_its_history(sources, tmp_path):
    ws = Workspace(tmp_path, sources)
    for _ in range(2):
        r = _cli(*_train(ws))
        assert r.returncode == 0, r.stderr
        steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
        assert steps == [1, 2]


def test_both_generation_paths_refuse_the_same_sampling_values():
    """The runtime's GenerationParams and the PyTorch path's SamplingParams share one check (library API too)."""
    from blockffn.runtime.sampling import GenerationParams
    from blockffn.sampling_params import SamplingParams
    from blockffn.validation import OptionError

    for bad in ({"top_p": float("nan")}, {"top_p": 0.0}, {"temperature": float("inf")}, {"seed": -1},
                {"max_tokens": 0}):
        for cls in (SamplingParams, GenerationParams):
            with pytest.raises(OptionError):
                cls(**bad)
    with pytest.raises(OptionError):
        GenerationParams(repetition_penalty=float("nan"))


def test_json_output_has_no_nan():
    from blockffn.cli.base import to_json

    text = to_json({"ppl": float("nan"), "cls": {"64": [1.0, float("inf")]}})
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert strict == {"ppl": None, "cls": {"64": [1.0, None]}}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_or_read_only_disk_is_one_line(code, capsys):
    """Root (as in CI) writes through permissions, so the disk errors are raised directly."""
    import click

    from blockffn.cli import _run

    @click.command()
    def write():
        raise OSError(code, os.strerror(code), "/data/out/model.safetensors")

    with pytest.raises(SystemExit) as exit_:
        _run(write, [], "blockffn")
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.splitlines() == [f"error: /data/out/model.safetensors: {os.strerror(code)}"]
