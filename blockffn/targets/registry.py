"""Named compilation targets.

Each preset is a TVM target JSON dict (the 0.27 wheel takes JSON-dict targets), a host triple, the library file
kind it produces and the toolchain it needs.  ``cpu`` builds for this machine.
"""

from __future__ import annotations

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

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target)


def _host_triple() -> str:
    return {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(platform.machine(),
                                                                          platform.machine())


TARGETS: dict[str, TargetPreset] = {
    "cpu": TargetPreset(
        name="cpu", description="this machine's CPU (LLVM, all cores)",
        target={"kind": "llvm"}, host_triple=_host_triple(), lib_suffix=".so"),
}


def get_target(name: str) -> TargetPreset:
    key = name.lower()
    for preset in TARGETS.values():
        if key == preset.name or key in preset.aliases:
            return preset
    raise BlockFFNError(f"unknown target {name!r}; valid targets: {', '.join(sorted(TARGETS))}")


def list_targets() -> list[TargetPreset]:
    return list(TARGETS.values())
