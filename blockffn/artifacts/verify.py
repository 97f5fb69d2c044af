"""`blockffn verify`: check that an artifact is what its target needs, without the target device and without
loading or running its library (native code from elsewhere).

Checks, each a line of the report; the first failure raises `ArtifactError` naming the file and the mismatch:
  files     - manifest/config/tensor-cache present, shards complete with matching md5, the library's size and
              sha256 as the manifest records them, built by this TVM version
  arch      - the library's object files are of the target's architecture (ELF x86-64/aarch64, Mach-O arm64)
  symbols   - the TVM library blob symbol, with the system-lib prefix for .tar system libraries
  kernels   - device code in the form the target loads: a CUDA fatbin for the preset's SM (no CUDA source),
              OpenCL C, or Metal Shading Language
  metadata  - the manifest's params (the library's `_metadata` at compile time) agree with the tensor cache
"""

from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path

from blockffn.artifacts.reader import ArtifactError, open_artifact
from blockffn.artifacts.weights import param_records

ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
MACHO_ARM64 = (0xFEEDFACF, 0x0100000C)
FATBIN_MAGIC = bytes.fromhex("50ed55ba")


def _objects(lib: Path) -> list[tuple[str, bytes]]:
    if lib.suffix == ".tar":
        with tarfile.open(lib) as tar:
            return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    return [(lib.name, lib.read_bytes())]


def _arch_of(blob: bytes) -> str | None:
    if blob[:4] == b"\x7fELF":
        machine = struct.unpack_from("<H", blob, 18)[0]
        return {v: k for k, v in ELF_MACHINES.items()}.get(machine, f"elf-machine-{machine}")
    if len(blob) >= 8 and struct.unpack_from("<II", blob, 0) == MACHO_ARM64:
        return "arm64-macho"
    return None


def _expected_arch(host_triple: str) -> str:
    if "apple" in host_triple:
        return "arm64-macho"
    if host_triple.startswith("aarch64") or host_triple.startswith("arm64"):
        return "aarch64"
    return "x86_64" if host_triple.startswith("x86_64") else host_triple


def verify_artifact(path: str | Path) -> list[str]:
    art = open_artifact(path)  # files, shards, md5, TVM version
    report = [f"files     ok: {len(art.tensor_cache['records'])} shard(s), md5 verified, library sha256 "
              f"verified, tvm {art.manifest['versions']['tvm']}"]
    lib = art.library
    target = art.manifest["target"]
    objects = _objects(lib)
    want = _expected_arch(target["host_triple"])
    checked = 0
    for name, blob in objects:
        arch = _arch_of(blob)
        if arch is None:
            continue
        if arch != want:
            raise ArtifactError(f"{lib}: object {name} is {arch}, but target {target['name']} needs {want}")
        checked += 1
    if checked == 0:
        raise ArtifactError(f"{lib}: no object file of a known format found")
    report.append(f"arch      ok: {checked} object(s) {want}")
    blob = b"".join(b for _, b in objects)
    prefix = art.manifest.get("system_lib_prefix")
    symbol = (f"{prefix}__tvm_ffi__library_bin" if prefix else "__tvm_ffi__library_bin").encode()
    if symbol not in blob:
        raise ArtifactError(f"{lib}: symbol {symbol.decode()} missing (wrong system-lib prefix?)")
    report.append(f"symbols   ok: {symbol.decode()}")
    kind = target["tvm_target"]["kind"]
    if kind == "cuda":
        sm = target["tvm_target"]["arch"].removeprefix("sm_")
        i = blob.find(FATBIN_MAGIC)
        if i < 0 or b"__global__" in blob:
            raise ArtifactError(f"{lib}: CUDA kernels are embedded as source, not a compiled fatbin")
        header_size, fat_size = struct.unpack_from("<HQ", blob, i + 6)
        fatbin = blob[i: i + header_size + fat_size]
        if f"sm_{sm}".encode() not in fatbin and f"compute_{sm}".encode() not in fatbin:
            raise ArtifactError(f"{lib}: fatbin has no code for sm_{sm}")
        report.append(f"kernels   ok: fatbin {len(fatbin)} bytes for sm_{sm}")
    elif kind == "opencl":
        if b"__kernel" not in blob:
            raise ArtifactError(f"{lib}: no OpenCL C kernels embedded")
        report.append("kernels   ok: OpenCL C source embedded")
    elif kind == "metal":
        if b"kernel void" not in blob:
            raise ArtifactError(f"{lib}: no Metal Shading Language kernels embedded")
        report.append("kernels   ok: Metal Shading Language source embedded")
    else:
        report.append("kernels   ok: host code only")
    # the manifest's params are the library's _metadata at compile time, and the library is that one (its size and
    # sha256 were checked), so nothing here loads or runs it
    records = [(r["name"], list(r["shape"]), r["dtype"]) for r in param_records(art.tensor_cache)]
    source = "manifest"
    declared = [(p["name"], list(p["shape"]), p["dtype"]) for p in art.manifest["params"]]
    if declared != records:
        first = next((d, r) for d, r in zip(declared + [None] * len(records), records + [None] * len(declared))
                     if d != r)
        raise ArtifactError(f"{lib}: {source} params and tensor-cache.json disagree at {json.dumps(first)}")
    report.append(f"metadata  ok: {len(records)} params agree ({source} vs tensor-cache.json)")
    if art.manifest.get("draft"):
        report.append(_verify_draft(art))
    return report


def _verify_draft(art) -> str:
    """The EAGLE draft built into ARTIFACT/draft: intact, same TVM, same target, shaped for this model."""
    from blockffn.artifacts.reader import open_draft

    from blockffn.artifacts.reader import inside

    entry = art.manifest["draft"]
    folder = inside(art.path, entry.get("folder") if isinstance(entry, dict) else entry, "manifest draft folder")
    draft = open_draft(folder)  # files, shards, md5, TVM version
    m = draft.manifest
    if m.get("target", {}).get("name") != art.manifest["target"]["name"]:
        raise ArtifactError(f"{folder}: draft built for target {m.get('target', {}).get('name')}, the model for "
                            f"{art.manifest['target']['name']}")
    if (m["hidden_size"], m["vocab_size"]) != (art.config.hidden_size, art.config.vocab_size):
        raise ArtifactError(f"{folder}: draft made for hidden_size {m['hidden_size']} / vocabulary "
                            f"{m['vocab_size']}, not this model's")
    records = [(r["name"], list(r["shape"])) for r in param_records(draft.tensor_cache)]
    if records != [(p["name"], list(p["shape"])) for p in m["params"]]:
        raise ArtifactError(f"{folder}: draft library params and tensor-cache.json disagree")
    return f"draft     ok: EAGLE head, {len(records)} params, draft vocabulary {m['draft_vocab_size']}"
