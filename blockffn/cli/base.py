"""What every command module shares: the `blockffn` Click group and small helpers."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import click

from blockffn import __version__, default_model_path


def _model_dir(path: str | None) -> Path:
    return Path(path) if path else default_model_path()


def to_json(obj, **kwargs) -> str:
    """Strict JSON (what every parser accepts): NaN and infinities, which ``json.dumps`` writes as bare ``NaN`` /
    ``Infinity``, become null."""
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _echo_err(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)


class _EchoHandler(logging.Handler):
    """Library progress lines (``logging`` under ``blockffn``) printed as the commands print: through click."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record))


def configure_logging(verbose: bool = False) -> None:
    """The ``blockffn`` loggers print INFO (DEBUG with ``-v``) on stdout, once per process."""
    log = logging.getLogger("blockffn")
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        log.addHandler(_EchoHandler())
        log.propagate = False


@contextlib.contextmanager
def quiet_logs():
    """No progress lines while a command's stdout is data (``--json``) or a single summary."""
    log = logging.getLogger("blockffn")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blockffn")
@click.option("-v", "--verbose", is_flag=True, help="Print the library's debug lines too.")
def cli(verbose: bool) -> None:
    """BlockFFN toolchain: prepare data, train, evaluate, generate; compile with TVM for edge targets."""
    configure_logging(verbose)
