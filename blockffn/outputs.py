"""Output folders that never destroy what the user did not ask to replace.

Every command that writes a folder builds it in a temp folder beside the target and renames it into place only on
success.  Before that it *claims* the target: it creates the folder (or, if it exists and is empty, uses it) and
creates ``.blockffn-claim`` in it exclusively (``O_EXCL``), so of two concurrent writers the second fails in one
line instead of silently replacing the first one's output.  ``--overwrite`` replaces only a folder that is itself
a blockffn output of the same kind (recognised by the files that kind always holds); a folder of anything else,
and a file, are refused.  Temp folders and claims left by killed runs are removed on the next run into the same
place, with a warning.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

from blockffn.errors import BlockFFNError

CLAIM = ".blockffn-claim"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# kind -> (what it is called, files that all must be present, files of which one must be present)
KINDS = {
    "artifact": ("a compiled artifact", ("blockffn-manifest.json",), ()),
    "model": ("a model folder", ("config.json",), _WEIGHTS),
    "data": ("a prepared data folder", ("meta.json", "train.tokens.npy"), ()),
}


class OutputError(BlockFFNError):
    """An output path that cannot be written without destroying something or racing another writer."""


def is_output_of_kind(folder: Path, kind: str) -> bool:
    """Whether ``folder`` is a blockffn output of ``kind`` (holds every file that kind always has)."""
    _, required, one_of = KINDS[kind]
    return (all((folder / f).is_file() for f in required)
            and (not one_of or any((folder / f).is_file() for f in one_of)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _claim_pid(claim: Path) -> int | None:
    try:
        return int(claim.read_text().strip() or "0")
    except (OSError, ValueError):
        return None


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def clean_leftovers(target: Path) -> None:
    """Remove the temp folders (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) and the claim of killed runs into
    ``target``; a run whose process still lives is left alone."""
    parent = target.parent
    if parent.is_dir():
        for p in parent.glob(f".{target.name}.*-*"):
            kind, _, rest = p.name[len(target.name) + 2:].partition("-")
            pid = rest.split("-")[0]
            if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
                _warn(f"removed {p}, left by a killed run (pid {pid})")
    claim = target / CLAIM
    if claim.is_file():
        pid = _claim_pid(claim)
        if pid is not None and pid != os.getpid() and not _pid_alive(pid):
            claim.unlink(missing_ok=True)
            _warn(f"{target}: removed the claim of a killed run (pid {pid})")


def check_output(target: str | Path, overwrite: bool, kind: str) -> None:
    """Refuse, in one line and before any work, an output ``target`` that this writer may not replace."""
    target = Path(target)
    what = KINDS[kind][0]
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder (give a folder path for {what})")
    if not target.is_dir():
        return
    entries = [p.name for p in target.iterdir()]
    if CLAIM in entries:
        pid = _claim_pid(target / CLAIM)
        if pid is not None and pid != os.getpid() and _pid_alive(pid):
            raise OutputError(f"{target}: being written by another blockffn process (pid {pid})")
        entries.remove(CLAIM)
    if not entries:
        return
    if not overwrite:
        raise OutputError(f"{target}: output folder exists and is not empty (pass --overwrite)")
    if not is_output_of_kind(target, kind):
        raise OutputError(f"{target}: --overwrite replaces only {what} written by blockffn, and this folder is "
                          f"not one (its files are kept; choose another output)")


def _claim(target: Path) -> bool:
    """Claim ``target`` for this process; True if this call created the folder."""
    created = False
    try:
        target.mkdir(parents=True)
        created = True
    except FileExistsError:
        pass
    try:
        fd = os.open(target / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise OutputError(f"{target}: being written by another blockffn process "
                          f"(pid {_claim_pid(target / CLAIM)})") from None
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return created


def _release(target: Path, created: bool) -> None:
    (target / CLAIM).unlink(missing_ok=True)
    if created:
        try:
            target.rmdir()
        except OSError:
            pass


class atomic_output_dir:
    """Context manager: yields a temp folder beside ``target``; renames it into place only on success.

    ``target`` is checked (``check_output``) and claimed on entry; ``kind`` says which blockffn outputs
    ``overwrite`` may replace."""

    def __init__(self, target: str | Path, overwrite: bool = False, kind: str = "model"):
        self.target, self.overwrite, self.kind = Path(target), overwrite, kind

    def __enter__(self) -> Path:
        clean_leftovers(self.target)
        check_output(self.target, self.overwrite, self.kind)
        self.created = _claim(self.target)
        try:  # a second writer may have filled it between the check and the claim
            check_output(self.target, self.overwrite, self.kind)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-{os.getpid()}-",
                                             dir=self.target.parent))
        except BaseException:
            _release(self.target, self.created)
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            _release(self.target, self.created)
            return False
        for f in self.tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if any(p.name != CLAIM for p in self.target.iterdir()):  # replacing an output (checked on entry)
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:  # only our claim: hand the (empty) folder over to the finished one
            (self.target / CLAIM).unlink()
            os.replace(self.tmp, self.target)
        os.chmod(self.target, 0o755)
        return False


class files_into_dir:
    """Context manager for commands that add their files to a folder other commands also fill (MLC's artifact
    folder: ``convert-weight`` writes the weights, ``gen-config`` the chat config, ``compile`` the library).

    Yields a temp folder beside ``target``; on success its files are moved in, those named ``last`` at the end
    (an index is never visible before what it indexes).  Without ``overwrite`` nothing is written if any of the
    new files, or any file matching ``owned`` (e.g. ``params_shard_*.bin``), is already there; with it, stale
    ``owned`` files the new set does not contain are removed.  Files of other commands are never touched.
    """

    def __init__(self, target: str | Path, overwrite: bool = False, owned: tuple[str, ...] = (),
                 last: tuple[str, ...] = ()):
        self.target, self.overwrite, self.owned, self.last = Path(target), overwrite, owned, last

    def _existing_owned(self) -> set[Path]:
        return {p for pattern in self.owned for p in self.target.glob(pattern)} if self.target.is_dir() else set()

    def __enter__(self) -> Path:
        clean_leftovers(self.target)
        if self.target.exists() and not self.target.is_dir():
            raise OutputError(f"{self.target}: exists and is not a folder")
        if self._existing_owned() and not self.overwrite:
            raise OutputError(f"{self.target}: already holds {sorted(p.name for p in self._existing_owned())[0]} "
                              f"(pass --overwrite to replace it)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-{os.getpid()}-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                return False
            new = sorted(p for p in self.tmp.iterdir())
            clash = [p.name for p in new if (self.target / p.name).exists()  # the same bytes are no clash (tokenizer)
                     and not filecmp.cmp(p, self.target / p.name, shallow=False)]
            if clash and not self.overwrite:
                raise OutputError(f"{self.target / clash[0]}: exists (pass --overwrite to replace it)")
            self.target.mkdir(exist_ok=True)
            stale = {p for p in self._existing_owned() if not (self.tmp / p.name).exists()}
            for p in sorted(new, key=lambda p: p.name in self.last):
                p.chmod(0o644)
                os.replace(p, self.target / p.name)
            for p in stale:
                p.unlink()
            return False
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
