"""Hostile inputs, the behaviour that goes with the refusals of test_hostile_inputs.py: --overwrite still replaces
an output of its own kind, concurrent and killed writers, chat on undecodable input, inspect without loading, a
re-run keeps its history, one sampling check for both generation paths, strict JSON, disk errors in one line."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys

import pytest

from hostile_workspace import Workspace, cli_arg, edit_json, train_args


def _cli(*args, stdin: bytes = b""):
    return subprocess.run([sys.executable, "-m", "blockffn.cli", *map(cli_arg, args)], capture_output=True, input=stdin,
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
    # the reply to the undecodable line (up to 3 tokens: greedy may stop at EOS), then /stats
    assert re.search(rb"last reply: [123] tokens", r.stdout) and b"session: 1 replies" in r.stdout, r.stdout


def test_inspect_shows_a_gpu_artifact_without_loading_its_library(sources, tmp_path):
    ws = Workspace(tmp_path, sources)
    edit_json(ws.art / "blockffn-manifest.json", lambda m: m.update(target={
        "name": "cuda", "device": "cuda", "tvm_target": {"kind": "cuda", "arch": "sm_90"},
        "host_triple": "x86_64-linux-gnu"}))
    r = _cli("inspect", ws.art)
    assert r.returncode == 0, r.stderr
    assert b"target     cuda" in r.stdout and b"kv_cache" in r.stdout


def test_rerunning_a_finished_training_run_keeps_its_history(sources, tmp_path):
    ws = Workspace(tmp_path, sources)
    for _ in range(2):
        r = _cli(*train_args(ws))
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
