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
from blockffn.cli import compile_main
from blockffn.artifacts.verify import verify_artifact
from blockffn.compiler.compile import CompileOptions, compile_model, system_lib_prefix
from blockffn.errors import BlockFFNError
from blockffn.targets import get_target


def build(tmp_path, target, quantization="q0f16"):
    out = tmp_path / target
    compile_model(CompileOptions(model_dir=default_model_path(), target=target, quantization=quantization,
                                 output=out, context_window=256, prefill_chunk=64))
    return out, json.loads((out / "blockffn-manifest.json").read_text())


@pytest.mark.parametrize("target,kernel_marker", [("android", b"__kernel"), ("android-adreno", b"__kernel"),
                                                  ("android-mali", b"__kernel"), ("iphone", b"kernel void"),
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
    expected_magic = b"\x7fELF" if target.startswith("android") else bytes.fromhex("cffaedfe")  # ELF aarch64 / Mach-O 64
    assert blobs.startswith(expected_magic) or expected_magic in blobs


def test_jetson_without_cross_compiler_fails_cleanly(tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", "from blockffn.cli import compile_main; compile_main()", "--target",
                        "jetson-orin-nx", "--output", str(out / "j")], capture_output=True, text=True,
                       env={**os.environ, "PATH": str(empty)})  # no aarch64-linux-gnu-g++ reachable
    assert r.returncode != 0 and "g++-aarch64-linux-gnu" in r.stderr and "--output NAME.tar" in r.stderr
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
    with pytest.raises(BlockFFNError, match="^--arch applies to CUDA targets only, not android$"):
        get_target("android").target_json("sm_87")
    with pytest.raises(BlockFFNError, match="^--arch must look like sm_87 or 87, got 'ampere'$"):
        get_target("cuda").target_json("ampere")


@pytest.mark.parametrize("target,output", [("android", "m.dylib"), ("android-mali", "m.so"), ("iphone", "m.so"),
                                           ("cpu", "m.dylib"), ("jetson", "m.a")])
def test_output_suffix_the_target_cannot_produce_is_refused(tmp_path, capsys, target, output):
    with pytest.raises(SystemExit) as e:
        compile_main(["--target", target, "--output", str(tmp_path / output)])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1
    assert f"target {target} cannot produce a {os.path.splitext(output)[1]} library" in err
    assert "NAME.tar" in err and not list(tmp_path.iterdir())


@pytest.mark.skipif(shutil.which("xcrun") is not None, reason="Xcode is present: .dylib can be linked here")
def test_metal_dylib_without_xcode_says_to_use_tar(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compile_main(["--target", "metal", "--output", str(tmp_path / "model.dylib")])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and len(err.splitlines()) == 1
    assert "xcrun" in err and "--output NAME.tar" in err and not list(tmp_path.iterdir())


def _path_without_cross_compiler(tmp_path):
    """A PATH with every tool of this one except aarch64-linux-gnu-* (nvcc and the host gcc stay reachable)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for tool in (os.scandir(d) if os.path.isdir(d) else []):
            if not tool.name.startswith("aarch64-linux-gnu-") and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool.path)
    return str(bin_dir)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc for the sm_87 fatbin")
def test_jetson_tar_output_gives_objects_to_link_on_the_device(tmp_path):
    lib = tmp_path / "out" / "jetson.tar"
    r = subprocess.run([sys.executable, "-c", "from blockffn.cli import compile_main; compile_main()", "--target",
                        "jetson", "--output", str(lib), "--context-window", "256", "--prefill-chunk", "64"],
                       capture_output=True, text=True, env={**os.environ, "PATH": _path_without_cross_compiler(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in lib.parent.iterdir()) == ["jetson.tar", "jetson.tar.DEPLOY.md"]
    objs = tmp_path / "objs"
    with tarfile.open(lib) as tar:  # only objects: tvm.runtime.load_module("jetson.tar") links every member
        tar.extractall(objs, filter="data")
    blobs = {p.name: p.read_bytes() for p in objs.iterdir()}
    assert blobs and all(b[:4] == b"\x7fELF" and struct.unpack_from("<H", b, 18)[0] == 183 for b in blobs.values())
    device_code = b"".join(blobs.values())
    assert bytes.fromhex("50ed55ba") in device_code and b"__global__" not in device_code  # sm_87 fatbin
    note = (lib.parent / "jetson.tar.DEPLOY.md").read_text()
    assert "tar -xf jetson.tar" in note and "g++ -shared -fPIC -o jetson.so" in note
    if shutil.which("aarch64-linux-gnu-g++"):  # link them as DEPLOY.md says (the Jetson's g++ here cross)
        so = tmp_path / "jetson.so"
        subprocess.run(["aarch64-linux-gnu-g++", "-shared", "-fPIC", "-o", str(so), *map(str, objs.iterdir())],
                       check=True)
        head = so.read_bytes()[:20]
        assert struct.unpack_from("<HH", head, 16) == (3, 183)  # ET_DYN, EM_AARCH64


def test_metal_tar_output_is_the_system_library_alone(tmp_path):
    lib = tmp_path / "metal.tar"
    compile_model(CompileOptions(model_dir=default_model_path(), target="metal", quantization="q0f16", output=lib,
                                 context_window=256, prefill_chunk=64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metal.tar", "metal.tar.DEPLOY.md"]
    with tarfile.open(lib) as tar:
        blob = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())
    prefix = system_lib_prefix("blockffn-tiny", "q0f16")
    assert f"{prefix}__tvm_ffi__library_bin".encode() in blob and b"kernel void" in blob
    assert bytes.fromhex("cffaedfe") in blob  # Mach-O 64-bit objects
    note = (tmp_path / "metal.tar.DEPLOY.md").read_text()
    assert "model library alone" in note and f"system://{prefix.rstrip('_')}" in note
