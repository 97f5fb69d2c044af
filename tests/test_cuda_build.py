"""The cuda preset builds on a machine without a GPU: kernels are an embedded fatbin for the requested SM."""

import json
import shutil
import struct

import pytest

from blockffn import default_model_path
from blockffn.compiler.compile import CompileOptions, compile_model

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")


def test_cuda_artifact_embeds_sm_fatbin(tmp_path):
    out = tmp_path / "cuda"
    compile_model(CompileOptions(model_dir=default_model_path(), target="cuda", arch="sm_87", quantization="q0f16",
                                 output=out, context_window=256, prefill_chunk=64))
    manifest = json.loads((out / "blockffn-manifest.json").read_text())
    assert manifest["target"]["tvm_target"]["arch"] == "sm_87" and manifest["target"]["device"] == "cuda"
    assert "LowerBlockFFNSparse" in manifest["passes"] and "ApplyDefaultSchedule" in " ".join(manifest["passes"])
    lib = (out / manifest["library"]).read_bytes()
    i = lib.find(bytes.fromhex("50ed55ba"))  # fatbin header magic
    assert i >= 0, "CUDA kernels were embedded as source, not compiled"
    header_size, fat_size = struct.unpack_from("<HQ", lib, i + 6)
    fatbin = lib[i: i + header_size + fat_size]
    assert b"sm_87" in fatbin or b"compute_87" in fatbin
    assert b"__global__" not in lib  # no CUDA source left for the device to compile
