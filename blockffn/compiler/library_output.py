"""Which library files a target can produce, the toolchain each needs, and writing one atomically.

``--output`` naming a file (``model.so``, ``model.tar``, ``model.dylib``) asks for the model library alone, in
that format: ``.tar`` is always possible (TVM writes the objects, nothing is linked, so it is the way to build for
a device whose linker this machine lacks); ``.so`` needs the preset's (cross) linker; ``.dylib`` needs Xcode.
Every refusal is one line saying what to do instead, raised before anything is compiled or written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from blockffn.errors import BlockFFNError

LIBRARY_SUFFIXES = (".so", ".tar", ".dylib", ".dll", ".a", ".o")


def check_library_output(preset, output: Path) -> str | None:
    """The library suffix ``output`` asks for (None for an artifact folder); refuses one the target cannot make."""
    suffix = output.suffix.lower()
    if suffix not in LIBRARY_SUFFIXES:
        return None
    if suffix not in preset.output_suffixes:
        choices = " or ".join(f"NAME{s}" for s in preset.output_suffixes)
        raise BlockFFNError(f"--output {output}: target {preset.name} cannot produce a {suffix} library; "
                            f"use --output {choices}, or a folder for a complete artifact")
    if output.is_dir():
        raise BlockFFNError(f"--output {output}: is a folder; a {suffix} library must be a file path")
    return suffix


def library_exporter(preset, suffix: str):
    """``fcompile`` for ``export_library`` (None: TVM's default), or a one-line error naming what to install."""
    if suffix == ".tar":
        return None
    if suffix == ".dylib":
        if shutil.which("xcrun") is None:
            raise BlockFFNError(f"target {preset.name}: a .dylib is linked by Xcode's clang (xcrun), which this "
                                f"machine lacks; use --output NAME.tar and link it on a Mac (see its DEPLOY.md)")
        return _xcode_dylib
    if preset.cross_cxx:
        if shutil.which(preset.cross_cxx) is None:
            raise BlockFFNError(f"target {preset.name} links with {preset.cross_cxx}, which is not installed "
                                f"(Debian: apt-get install {preset.cross_package}); or use --output NAME.tar for "
                                f"objects to link on the device")
        from tvm.support import cc

        return cc.cross_compiler(preset.cross_cxx)
    return None


def _xcode_dylib(output, objects, **kwargs):
    from tvm.support import xcode

    return xcode.create_dylib(output, objects, arch="arm64", sdk="macosx")


_xcode_dylib.output_format = "dylib"


def write_library(executable, output: Path, fcompile, deploy_note: str, overwrite: bool = False) -> Path:
    """Export ``executable`` to ``output`` and its DEPLOY note to ``<output>.DEPLOY.md``; both appear only
    once complete (written in a temporary folder beside them, then renamed)."""
    note = output.with_name(output.name + ".DEPLOY.md")
    for path in (output, note):
        if path.exists() and not overwrite:
            raise BlockFFNError(f"{path}: exists (pass --overwrite)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        executable.export_library(str(tmp / output.name), **({"fcompile": fcompile} if fcompile else {}))
        (tmp / note.name).write_text(deploy_note)
        (tmp / note.name).replace(note)
        (tmp / output.name).replace(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return note
