"""Hostile and careless inputs (issue 15): every case is one CLI run in a subprocess that must fail in one line
(exit 2 for a bad option value, 1 otherwise), without a traceback or a crash signal, and leave every file that
existed before it byte-identical.  Cases that read an artifact or model work on copies in their own tmp folder."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from blockffn import default_model_path
from hostile_workspace import Workspace, cli_arg, edit_json, train_args


def _lib(art: Path) -> Path:
    return art / json.loads((art / "blockffn-manifest.json").read_text())["library"]


def _draft_lib(art: Path) -> Path:
    return next((art / "draft").glob("*.so"))


def _truncate(f: Path) -> Path:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


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


def _no_trainer_state(ws: Workspace) -> list:
    shutil.copytree(ws.model, ws.root / "run" / "checkpoint")
    return train_args(ws)


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
        lambda ws: _then(edit_json(ws.art / "blockffn-manifest.json", lambda m: m.pop("target")), _gen(ws.art))),
    "manifest without target: inspect": Case(
        lambda ws: _then(edit_json(ws.art / "blockffn-manifest.json", lambda m: m.pop("target")), ["inspect", ws.art])),
    "manifest without target: verify": Case(
        lambda ws: _then(edit_json(ws.art / "blockffn-manifest.json", lambda m: m.pop("target")), ["verify", ws.art])),
    "manifest is a JSON list: verify": Case(
        lambda ws: _then((ws.art / "blockffn-manifest.json").write_text("[1, 2]"), ["verify", ws.art])),
    "draft manifest without hidden_size: generate": Case(
        lambda ws: _then(edit_json(ws.art / "draft" / "blockffn-draft.json", lambda m: m.pop("hidden_size")),
                         _gen(ws.art, "--speculative", "chain"))),
    "draft token_map out of range: verify": Case(
        lambda ws: _then(edit_json(ws.art / "draft" / "blockffn-draft.json", lambda m: m.update(
            token_map=[10**6] * m["draft_vocab_size"])), ["verify", ws.art])),
    "non-UTF-8 --stop: generate --artifact": Case(
        lambda ws: _gen(ws.art, "--stop", b"\xff"), rc=2),
    "manifest without versions: generate": Case(
        lambda ws: _then(edit_json(ws.art / "blockffn-manifest.json", lambda m: m.pop("versions")), _gen(ws.art))),
    "chat config without model_config: chat": Case(
        lambda ws: _then(edit_json(ws.art / "mlc-chat-config.json", lambda c: c.pop("model_config")),
                         ["chat", "--artifact", ws.art]), stdin=b"hello\n/exit\n"),
    "tensor cache missing a parameter: generate": Case(
        lambda ws: _then(edit_json(ws.art / "tensor-cache.json", lambda d: d["records"][0]["records"].pop()),
                         _gen(ws.art))),
    "tensor cache is a list: generate": Case(
        lambda ws: _then((ws.art / "tensor-cache.json").write_text("[]"), _gen(ws.art))),
    "malformed tokenizer.json: generate --artifact": Case(
        lambda ws: _then((ws.art / "tokenizer.json").write_text('{"model": 3}'), _gen(ws.art))),
    "malformed tokenizer.json: generate --model": Case(
        lambda ws: _then((ws.model / "tokenizer.json").write_text("{"), _gen_pt("--model", ws.model))),
    "tie_word_embeddings 'yes': generate --model": Case(
        lambda ws: _then(edit_json(ws.model / "config.json", lambda c: c.update(tie_word_embeddings="yes")),
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
        lambda ws: _then(edit_json(ws.model / "config.json", lambda c: c.update(tie_word_embeddings="yes")),
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
    "train --lr nan": Case(lambda ws: train_args(ws, "--lr", "nan"), rc=2),
    "train --lr -1": Case(lambda ws: train_args(ws, "--lr", "-1"), rc=2),
    "train --steps 0": Case(lambda ws: train_args(ws, "--steps", "0"), rc=2),
    "train --seq-len 0": Case(lambda ws: train_args(ws, "--seq-len", "0"), rc=2),
    "train --batch-size 0": Case(lambda ws: train_args(ws, "--batch-size", "0"), rc=2),
    "train --eval-every 0": Case(lambda ws: train_args(ws, "--eval-every", "0"), rc=2),
    "train --decay-frac nan": Case(lambda ws: train_args(ws, "--decay-frac", "nan"), rc=2),
    "train --time-budget nan": Case(lambda ws: train_args(ws, "--time-budget", "nan"), rc=2),
    "train --lambda-cs inf": Case(lambda ws: train_args(ws, "--lambda-cs", "inf"), rc=2),
    "train --chunk-len 0": Case(lambda ws: train_args(ws, "--chunk-len", "0"), rc=2),
    "train --seed -1": Case(lambda ws: train_args(ws, "--seed", "-1"), rc=2),
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
    "train -o naming a file": Case(lambda ws: train_args(ws, out=ws.file("x.txt"))),
}


def run_case(case: Case, root: Path, sources: dict[str, Path]):
    """Prepare the case in ``root``, run it; returns (the process, files changed or removed)."""
    ws = Workspace(root, sources)
    argv = case.argv(ws)
    watched = [root, Path(default_model_path())]
    before = _hashes(watched)
    r = subprocess.run([sys.executable, "-m", "blockffn.cli", *map(cli_arg, argv)], capture_output=True,
                       input=case.stdin if case.stdin is not None else b"", timeout=300)
    after = _hashes(watched)
    return r, sorted(str(f) for f, h in before.items() if after.get(f) != h)


def _hashes(folders) -> dict[Path, str]:
    return {f: hashlib.sha256(f.read_bytes()).hexdigest()
            for folder in folders for f in sorted(Path(folder).rglob("*")) if f.is_file() and not f.is_symlink()}


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
