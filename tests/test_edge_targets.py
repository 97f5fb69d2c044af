"""Edge presets build the bundled model on this machine (no device toolchain needed for system libraries)."""

import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile

import pytest

from blockffn import default_model_path
from blockffn.artifacts.verify import verify_artifact
from blockffn.compiler.compile import CompileOptions, compile_model, system_lib_prefix
from blockffn.targets import get_target


def build(tmp_path, target, quantization="q0f16"):
    out = tmp_path / target
    compile_model(CompileOptions(model_dir=default_model_path(), target=target, quantization=quantization,
                                 output=out, context_window=256, prefill_chunk=64), log=lambda *_: None)
    return out, json.loads((out / "blockffn-manifest.json").read_text())


@pytest.mark.parametrize("target,kernel_marker", [("android", b"__kernel"), ("iphone", b"kernel void"),
                                                  ("metal", b"kernel void")])
def test_system_library_presets(tmp_path, target, kernel_marker):
    out, manifest = build(tmp_path, target)
    prefix = system_lib_prefix("blockffn-tiny", "q0f16")
    assert manifest["system_lib_prefix"] == prefix == "blockffn_tiny_q0f16_"
    lib = out / manifest["library"]
    assert lib.suffix == ".tar"
    blobs = b""
    with tarfile.open(lib) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".o")]
        assert members
        for m in members:
            blobs += tar.extractfile(m).read()
    assert f"{prefix}__tvm_ffi__library_bin".encode() in blobs  # the symbol MLC apps look up
    assert kernel_marker in blobs  # OpenCL C / MSL source embedded for on-device compilation
    assert f"system://{prefix.rstrip('_')}" in (out / "DEPLOY.md").read_text()
    report = verify_artifact(out)
    assert any(line.startswith("kernels   ok") for line in report)
    expected_magic = b"\x7fELF" if target == "android" else bytes.fromhex("cffaedfe")  # ELF aarch64 / Mach-O 64
    assert blobs.startswith(expected_magic) or expected_magic in blobs


def test_jetson_without_cross_compiler_fails_cleanly(tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", "from blockffn.cli import compile_main; compile_main()", "--target",
                        "jetson-orin-nx", "--output", str(out / "j")], capture_output=True, text=True,
                       env={**os.environ, "PATH": str(empty)})  # no aarch64-linux-gnu-g++ reachable
    assert r.returncode != 0 and "g++-aarch64-linux-gnu" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(out.iterdir())


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("nvcc") is None,
                    reason="needs aarch64-linux-gnu-g++ (Debian g++-aarch64-linux-gnu) and nvcc")
def test_jetson_shared_library_is_aarch64_with_sm87_fatbin(tmp_path):
    out, manifest = build(tmp_path, "jetson")
    lib = (out / manifest["library"]).read_bytes()
    assert lib[:4] == b"\x7fELF" and lib[4] == 2  # 64-bit ELF
    assert struct.unpack_from("<H", lib, 18)[0] == 183  # e_machine = EM_AARCH64
    i = lib.find(bytes.fromhex("50ed55ba"))
    assert i >= 0 and b"__global__" not in lib  # compiled fatbin, not CUDA source
    header_size, fat_size = struct.unpack_from("<HQ", lib, i + 6)
    assert b"sm_87" in lib[i: i + header_size + fat_size] or b"compute_87" in lib[i: i + header_size + fat_size]
    assert "kernels   ok: fatbin" in "\n".join(verify_artifact(out))


def test_aliases_and_arch_override():
    assert get_target("jetson-agx-orin").name == "jetson" and get_target("JETSON-ORIN-NANO").name == "jetson"
    assert get_target("cuda").target_json("87")["arch"] == "sm_87"
    with pytest.raises(Exception, match="CUDA targets only"):
        get_target("android").target_json("sm_87")
