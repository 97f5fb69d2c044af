"""Build-host set-up for CUDA targets: device code is compiled to a fatbin for the preset's SM at build time.

TVM embeds compiled CUDA kernels only when its CUDA runtime plugin can be loaded on the build machine, which needs a
``libcuda.so.1``.  On a machine without a GPU driver we build a stub whose every entry point returns
``CUDA_ERROR_NO_DEVICE`` (it is only used so the plugin loads; nothing runs on it, and it is never shipped), and
register ``tvm_callback_cuda_compile`` to run ``nvcc -gencode`` for the exact SM (Tegra has no cross-SM binary
compatibility, so Jetson needs sm_87 exactly), embedding PTX too for forward compatibility.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from blockffn.errors import BlockFFNError

_STUB_SOURCE = r"""
#define S(name) int name() { return 100; }
S(cuDeviceGetName) S(cuFuncSetAttribute) S(cuLaunchKernelEx) S(cuModuleGetFunction)
S(cuModuleLoadData) S(cuModuleUnload) S(cuTensorMapEncodeTiled) S(cuModuleGetGlobal)
S(cuLaunchKernel) S(cuLaunchCooperativeKernel) S(cuInit) S(cuDriverGetVersion) S(cuCtxGetCurrent)
S(cuDeviceGet) S(cuDeviceGetAttribute) S(cuPointerGetAttribute) S(cuCtxSetCurrent)
int cuGetErrorName(int e, const char** s) { *s = "CUDA_STUB"; return 0; }
int cuGetErrorString(int e, const char** s) { *s = "blockffn build-host libcuda stub"; return 0; }
"""

def _ensure_libcuda() -> None:
    """Load the real libcuda if present, else a freshly built build-host stub (same SONAME, RTLD_GLOBAL)."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        raise BlockFFNError("building for CUDA needs a C compiler for the build-host libcuda stub "
                            "(apt-get install gcc)")
    stub_dir = Path(tempfile.gettempdir()) / f"blockffn-cudastub-{os.getuid()}"
    stub_dir.mkdir(exist_ok=True)
    lib = stub_dir / "libcuda.so.1"
    if not lib.exists():
        src = stub_dir / "stub.c"
        src.write_text(_STUB_SOURCE)
        tmp = stub_dir / f"libcuda.so.1.{os.getpid()}"
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)], check=True,
                       capture_output=True)
        os.replace(tmp, lib)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def _load_tvm_cuda_runtime() -> None:
    """TVM loads its CUDA runtime plugin at import time and silently skips it when libcuda is missing; without
    it, codegen embeds CUDA *source*.  Load it now that a libcuda is present (idempotent)."""
    import tvm

    plugin = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if not plugin.exists():
        raise BlockFFNError(f"{plugin}: missing; the installed apache-tvm wheel has no CUDA runtime plugin")
    for cudart in sorted(Path("/usr/local").glob("cuda*/lib64/libcudart.so.1*")):
        try:
            ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
            break
        except OSError:
            continue
    try:
        ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise BlockFFNError(f"cannot load TVM's CUDA runtime plugin for the build ({e}); install the CUDA "
                            f"toolkit's runtime (libcudart)") from None


CALLBACK = "tvm_callback_cuda_compile"


@contextlib.contextmanager
def cuda_build(sm: str):
    """While inside, TVM compiles CUDA kernels into an sm_<sm> fatbin (plus PTX) with nvcc.  The compile callback
    is registered for the build only: on leaving, the previous one (if any) is back, so no global setting outlives
    the build that needed it."""
    if shutil.which("nvcc") is None:
        raise BlockFFNError("building for CUDA needs nvcc on PATH (install the CUDA toolkit, e.g. Debian "
                            "nvidia-cuda-toolkit, or NVIDIA's cuda-nvcc)")
    _ensure_libcuda()
    _load_tvm_cuda_runtime()  # (a process-wide library load: the plugin that embeds compiled kernels)
    import tvm
    import tvm_ffi
    from tvm.support import nvcc

    def _cuda_compile(code, *_args):
        with tvm.target.Target({"kind": "cuda", "arch": f"sm_{sm}"}):
            return nvcc.compile_cuda(code, target_format="fatbin", compiler="nvcc",
                                     arch=["-gencode", f"arch=compute_{sm},code=sm_{sm}",
                                           "-gencode", f"arch=compute_{sm},code=compute_{sm}"])

    previous = tvm_ffi.get_global_func(CALLBACK, allow_missing=True)
    tvm_ffi.register_global_func(CALLBACK, _cuda_compile, override=True)
    try:
        yield
    finally:
        if previous is None:
            tvm_ffi.remove_global_func(CALLBACK)
        else:
            tvm_ffi.register_global_func(CALLBACK, previous, override=True)
