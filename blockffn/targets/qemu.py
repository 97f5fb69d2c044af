"""Run a Python script as an aarch64 process on this machine: qemu-aarch64 + the arm64 sysroot and aarch64 TVM
wheels that tools/build_qemu_sysroot.sh writes (default ``.cache/qemu-aarch64`` in the source tree; the
``BLOCKFFN_QEMU_AARCH64`` environment variable names another).  Used to execute ``cpu-aarch64`` builds in tests
and benchmarks without an Arm machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SYSROOT_ENV = "BLOCKFFN_QEMU_AARCH64"


def default_sysroot() -> Path:
    return Path(os.environ.get(SYSROOT_ENV, Path(__file__).resolve().parents[2] / ".cache" / "qemu-aarch64"))


def unavailable_reason(sysroot: Path | None = None) -> str | None:
    """Why aarch64 scripts cannot run here (a sentence naming the fix), or None when they can."""
    sysroot = sysroot or default_sysroot()
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 not installed (Debian: apt-get install qemu-user)"
    if not (sysroot / "READY").exists():
        return f"no arm64 Python sysroot at {sysroot} (run tools/build_qemu_sysroot.sh)"
    return None


def run_python(script: str | Path, args: list[str], sysroot: Path | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python3.11 script args`` under qemu-aarch64 with the aarch64 wheels on PYTHONPATH (output captured)."""
    sysroot = sysroot or default_sysroot()
    python = sysroot / "sysroot" / "usr" / "bin" / "python3.11"
    env = {**os.environ, "PYTHONPATH": str(sysroot / "site"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["qemu-aarch64", "-L", str(sysroot / "sysroot"), str(python), str(script), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
