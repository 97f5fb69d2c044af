"""What the hostile-input tests share: a per-test workspace with private copies of a compiled artifact, the bundled
model and a prepared data folder, and small helpers to damage them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TEXT = "\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(40))


class Workspace:
    """One case's folder; ``ws.art``/``ws.model``/``ws.data`` are private copies made on first use."""

    def __init__(self, root: Path, sources: dict[str, Path]):
        self.root, self.sources = root, sources

    def _copy(self, name: str) -> Path:
        dst = self.root / name
        if not dst.exists():
            shutil.copytree(self.sources[name], dst, symlinks=True)
        return dst

    art = property(lambda self: self._copy("art"))
    model = property(lambda self: self._copy("model"))
    data = property(lambda self: self._copy("data"))

    def file(self, name: str, content: str | bytes = TEXT) -> Path:
        f = self.root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        return f

    def unrelated(self, name: str = "mine") -> Path:
        """A folder of the user's own files (not a blockffn output)."""
        self.file(f"{name}/thesis.tex", "\\documentclass{article}")
        self.file(f"{name}/notes/todo.txt", "buy milk")
        return self.root / name


def edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def train_args(ws: Workspace, *extra, out: Path | None = None) -> list:
    return ["train", "--data", ws.data, "-o", out or ws.root / "run", "--steps", "2", "--batch-size", "2", "--seq-len",
            "16", "--eval-every", "2", "--eval-tokens", "64", "--layers", "1", *extra]


def cli_arg(a):
    return a if isinstance(a, bytes) else str(a)
