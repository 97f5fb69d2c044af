"""What every command module shares: the `blockffn` Click group and small helpers."""

from __future__ import annotations

from pathlib import Path

import click

from blockffn import __version__, default_model_path


def _model_dir(path: str | None) -> Path:
    return Path(path) if path else default_model_path()


def _floats(values) -> list:
    """Numbers for JSON output; NaN (a metric with no data, e.g. text shorter than the window) becomes null."""
    return [None if v != v else float(v) for v in values]


def _echo_err(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blockffn")
def cli() -> None:
    """BlockFFN toolchain: prepare data, train, evaluate, generate; compile with TVM for edge targets."""
