"""Named compilation targets.

Each preset is a TVM target JSON dict (the 0.27 wheel takes JSON-dict targets), a host triple, the library file
kind it produces and the toolchain it needs.  ``cpu`` builds for this machine.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field

from blockffn.errors import BlockFFNError


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    target: dict
    host_triple: str
    lib_suffix: str  # ".so" shared library, ".tar" system library
    toolchain: str = "host C compiler (gcc/clang)"
    aliases: tuple = field(default_factory=tuple)
    device: str = "cpu"  # runtime device kind
    kernel_family: str = "cpu"  # which sparse BlockFFN kernels (blockffn/schedules) the target uses
    system_lib: bool = False  # .tar system library for static linking into an app (Android / iOS)
    cross_cxx: str | None = None  # cross compiler that links the .so (None: host compiler)
    cross_package: str | None = None  # Debian package that provides cross_cxx
    # library formats `--output FILE.<suffix>` may ask for (library-only builds); lib_suffix is what folders get
    output_suffixes: tuple = (".so", ".tar")

    def target_json(self, arch: str | None = None) -> dict:
        """The target dict, with a CUDA arch override (``sm_90`` or ``90``) applied."""
        t = dict(self.target)
        if t.get("arch") == LOCAL_GPU:  # asked only now: listing or importing the presets runs no subprocess
            t["arch"] = _local_cuda_arch()
        if self.name == "cpu":  # this machine: let LLVM use its vector units (baseline x86-64 is SSE2 only)
            t.setdefault("mcpu", _host_cpu())
        if arch:
            if t.get("kind") != "cuda":
                raise BlockFFNError(f"--arch applies to CUDA targets only, not {self.name}")
            sm = arch.lower().removeprefix("sm_")
            if not sm.isdigit():
                raise BlockFFNError(f"--arch must look like sm_87 or 87, got {arch!r}")
            t["arch"] = f"sm_{sm}"
        return t

    def tvm_target(self, arch: str | None = None):
        import tvm

        return tvm.target.Target(self.target_json(arch))


def _host_triple() -> str:
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(platform.machine(),
                                                                          platform.machine())


def _host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


LOCAL_GPU = "local"  # the `cuda` preset's arch: this machine's GPU, resolved when a target is made


@functools.lru_cache(maxsize=None)
def _local_cuda_arch() -> str:
    """Compute capability of the local GPU (nvidia-smi), else sm_90; override with --arch."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                           text=True)
        cap = r.stdout.strip().splitlines()[0].replace(".", "") if r.returncode == 0 and r.stdout.strip() else ""
        if cap.isdigit():
            return f"sm_{cap}"
    return "sm_90"


_CUDA_LIMITS = {"max_threads_per_block": 1024, "max_num_threads": 1024, "thread_warp_size": 32,
                "max_shared_memory_per_block": 49152}

TARGETS: dict[str, TargetPreset] = {
    "cpu": TargetPreset(
        name="cpu", description="this machine's CPU (LLVM, all cores)",
        target={"kind": "llvm"}, host_triple=_host_triple(), lib_suffix=".so"),
    "cuda": TargetPreset(
        name="cuda", description="local NVIDIA GPU (arch from nvidia-smi, else sm_90; --arch overrides)",
        target={"kind": "cuda", "arch": LOCAL_GPU, **_CUDA_LIMITS, "host": {"kind": "llvm"}},
        host_triple=_host_triple(), lib_suffix=".so", toolchain="nvcc (CUDA toolkit) + host C compiler",
        device="cuda", kernel_family="gpu"),
    "jetson": TargetPreset(
        name="jetson", description="NVIDIA Jetson Orin (CUDA sm_87, aarch64 Linux host, cortex-a78)",
        target={"kind": "cuda", "arch": "sm_87", **_CUDA_LIMITS,
                "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"}},
        host_triple="aarch64-linux-gnu", lib_suffix=".so",
        toolchain="nvcc (CUDA toolkit) + aarch64-linux-gnu-g++", device="cuda", kernel_family="gpu",
        cross_cxx="aarch64-linux-gnu-g++", cross_package="g++-aarch64-linux-gnu",
        aliases=("jetson-orin", "jetson-orin-nx", "jetson-agx-orin", "jetson-orin-nano")),
    "cpu-aarch64": TargetPreset(
        name="cpu-aarch64", description="64-bit Arm Linux CPU (LLVM, cortex-a78 as on Jetson Orin; runs under "
                                        "qemu-aarch64 in tests)",
        target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78"},
        host_triple="aarch64-linux-gnu", lib_suffix=".so", toolchain="aarch64-linux-gnu-g++",
        cross_cxx="aarch64-linux-gnu-g++", cross_package="g++-aarch64-linux-gnu",
        aliases=("jetson-cpu", "aarch64", "arm64-linux")),
    "android": TargetPreset(
        name="android", description="Android phones, OpenCL GPU (system library for the MLC Android app)",
        target={"kind": "opencl", "host": {"kind": "llvm", "mtriple": "aarch64-linux-android"}},
        host_triple="aarch64-linux-android", lib_suffix=".tar", toolchain="none (Android NDK links the app)",
        device="opencl", kernel_family="gpu", system_lib=True, output_suffixes=(".tar",)),
    "android-adreno": TargetPreset(
        name="android-adreno", description="Android with Qualcomm Adreno GPU (OpenCL, 512 threads per block)",
        target={"kind": "opencl", "device": "adreno", "max_threads_per_block": 512,
                "host": {"kind": "llvm", "mtriple": "aarch64-linux-android"}},
        host_triple="aarch64-linux-android", lib_suffix=".tar", toolchain="none (Android NDK links the app)",
        device="opencl", kernel_family="gpu", system_lib=True, output_suffixes=(".tar",)),
    "android-mali": TargetPreset(
        name="android-mali", description="Android with Arm Mali GPU (OpenCL)",
        target={"kind": "opencl", "host": {"kind": "llvm", "mtriple": "aarch64-linux-android"}},
        host_triple="aarch64-linux-android", lib_suffix=".tar", toolchain="none (Android NDK links the app)",
        device="opencl", kernel_family="gpu", system_lib=True, output_suffixes=(".tar",)),
    "metal": TargetPreset(
        name="metal", description="Apple silicon Mac, Metal GPU (MSL compiled on the device at load)",
        target={"kind": "metal", "max_threads_per_block": 256, "max_shared_memory_per_block": 32768,
                "thread_warp_size": 1, "host": {"kind": "llvm", "mtriple": "arm64-apple-macos"}},
        host_triple="arm64-apple-macos", lib_suffix=".tar", toolchain="none (Xcode links the .dylib on a Mac)",
        device="metal", kernel_family="gpu", system_lib=True, output_suffixes=(".tar", ".dylib")),
    "iphone": TargetPreset(
        name="iphone", description="iPhone / iPad, Metal GPU (system library for the MLC iOS app)",
        target={"kind": "metal", "max_threads_per_block": 256, "max_shared_memory_per_block": 32768,
                "thread_warp_size": 1, "libs": ["iphoneos"],
                "host": {"kind": "llvm", "mtriple": "arm64-apple-ios"}},
        host_triple="arm64-apple-ios", lib_suffix=".tar", toolchain="none (Xcode links the app)",
        device="metal", kernel_family="gpu", system_lib=True, output_suffixes=(".tar",)),
}


def get_target(name: str) -> TargetPreset:
    key = name.lower()
    for preset in TARGETS.values():
        if key == preset.name or key in preset.aliases:
            return preset
    raise BlockFFNError(f"unknown target {name!r}; valid targets: {', '.join(sorted(TARGETS))}")


def list_targets() -> list[TargetPreset]:
    return list(TARGETS.values())
