"""Paths and byte ranges an artifact names stay inside it: a tensor cache or manifest pointing elsewhere, or at
bytes past a shard's end, is refused in one line before anything is read or loaded (never followed, never a
segfault)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockffn.artifacts.reader import ArtifactError, open_artifact


@pytest.fixture(scope="module")
def built(bundled_cpu_artifact):
    return bundled_cpu_artifact


@pytest.fixture
def art(built, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(built, copy, symlinks=True)
    return copy


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _verify(art):
    return subprocess.run([sys.executable, "-m", "blockffn.cli", "verify", str(art)], capture_output=True, text=True)


def _first_record(doc):
    return doc["records"][0]["records"][0]


CASES = {
    "dataPath ..": lambda a, o: _edit(a / "tensor-cache.json", lambda d: d["records"][0].update(
        dataPath="../" + a.name + "/" + d["records"][0]["dataPath"])),
    "dataPath absolute": lambda a, o: _edit(a / "tensor-cache.json", lambda d: d["records"][0].update(
        dataPath=str((a / d["records"][0]["dataPath"]).resolve()))),
    "dataPath symlink out": lambda a, o: (shutil.move(a / "params_shard_0.bin", o / "shard.bin"),
                                          os.symlink(o / "shard.bin", a / "params_shard_0.bin")),
    "library ..": lambda a, o: _edit(a / "blockffn-manifest.json", lambda m: m.update(
        library="../" + a.name + "/" + m["library"])),
    "library absolute": lambda a, o: _edit(a / "blockffn-manifest.json", lambda m: m.update(
        library=str((a / m["library"]).resolve()))),
    "draft folder ..": lambda a, o: _edit(a / "blockffn-manifest.json", lambda m: m["draft"].update(
        folder="../" + a.name + "/draft")),
    "byte range past the shard": lambda a, o: _edit(a / "tensor-cache.json", lambda d: _first_record(d).update(
        byteOffset=d["records"][0]["nbytes"] - 4)),
    "nbytes not shape x dtype": lambda a, o: _edit(a / "tensor-cache.json", lambda d: _first_record(d).update(
        nbytes=_first_record(d)["nbytes"] - 4)),
    "negative offset": lambda a, o: _edit(a / "tensor-cache.json", lambda d: _first_record(d).update(byteOffset=-8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_escaping_or_out_of_range_artifacts_are_refused_in_one_line(art, tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    if case.startswith("draft") and not (art / "draft").exists():
        pytest.skip("artifact built without a draft")
    CASES[case](art, outside)
    r = _verify(art)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "inside the artifact" in r.stderr or "outside the artifact" in r.stderr or "corrupt" in r.stderr


FIELDS = st.sampled_from(["byteOffset", "nbytes", "shape", "dtype", "dataPath"])
VALUES = st.one_of(st.integers(-2**40, 2**40), st.text(max_size=12), st.lists(st.integers(-4, 2**20), max_size=3),
                   st.none(), st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=FIELDS, value=VALUES, which=st.integers(0, 40))
def test_mutated_tensor_cache_fields_are_refused_or_harmless(art, field, value, which):
    """Any value in any record field: open_artifact (everything the runtime checks before loading) either raises
    ArtifactError or the mutation leaves the record meaning the same bytes."""
    path = art / "tensor-cache.json"
    original = path.read_text()
    doc = json.loads(original)
    shard = doc["records"][0]
    try:
        if field == "dataPath":
            before = shard["dataPath"]
            shard["dataPath"] = value
        else:
            rec = shard["records"][which % len(shard["records"])]
            before = rec[field]
            rec[field] = value
        path.write_text(json.dumps(doc))
        try:
            open_artifact(art, verify_md5=False)
        except ArtifactError:
            return
        assert value == before  # accepted only when nothing changed
    finally:
        path.write_text(original)


MANIFEST_FIELDS = st.sampled_from(["target", "library", "versions", "params", "quantization", "weight_layout",
                                   "library_bytes", "library_sha256", "functions", "dtype", "ffn", "max_batch_size",
                                   "context_window_size", "prefill_chunk_size"])
MANIFEST_VALUES = st.one_of(VALUES, st.dictionaries(st.sampled_from(["name", "device", "kind", "tvm"]),
                                                    st.one_of(st.text(max_size=6), st.integers()), max_size=3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=MANIFEST_FIELDS, value=MANIFEST_VALUES, drop=st.booleans())
def test_mutated_manifest_fields_are_refused_or_harmless(art, field, value, drop):
    """Any value (or none) in a manifest field: opening the artifact and setting up its library and KV cache (all
    a command does before generating) raises ArtifactError unless the field still means the same.  A crash would
    take the test process down with it."""
    from blockffn.runtime.engine import Engine

    path = art / "blockffn-manifest.json"
    original = path.read_text()
    doc = json.loads(original)
    before = doc.get(field)
    if drop:
        doc.pop(field, None)
    else:
        doc[field] = value
    path.write_text(json.dumps(doc))
    try:
        try:
            Engine(art, verify_md5=False)
        except ArtifactError:
            return
        assert not drop and value == before, (field, value, drop)
    finally:
        path.write_text(original)
