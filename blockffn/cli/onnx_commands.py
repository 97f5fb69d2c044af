"""`blockffn export-onnx | compile-onnx`: ONNX as an interchange format, out of our model and into our compiler."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from blockffn.cli.base import _model_dir, cli
from blockffn.errors import BlockFFNError


def _claim_output(output: Path, suffix: str, overwrite: bool) -> None:
    """Refuse an output that exists unless --overwrite, and never replace a folder."""
    if output.suffix != suffix:
        raise BlockFFNError(f"{output}: the output must be a {suffix} file")
    if output.is_dir():
        raise BlockFFNError(f"{output} is a folder; give a {suffix} file name")
    if output.exists() and not overwrite:
        raise BlockFFNError(f"{output} exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise BlockFFNError(f"{output.parent}: no such folder")


@cli.command("export-onnx")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder (default: the bundled model).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="The .onnx file to write.")
@click.option("--with-past", is_flag=True, help="KV-cache inputs/outputs (past_key_values.* / present.*), "
                                               "named as ONNX Runtime GenAI and Optimum name them.")
@click.option("--opset", type=click.IntRange(17, 18), default=18, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def export_onnx_cmd(model_dir, output, with_past, opset, overwrite) -> None:
    """Export the PyTorch reference model (dense FFN, fp32) to ONNX, checked by onnx.checker.  Models over 2 GB keep
    their weights in OUTPUT.data beside the graph."""
    from blockffn.model import load_model
    from blockffn.model.onnx_export import export_onnx

    _claim_output(output, ".onnx", overwrite)
    model = load_model(_model_dir(model_dir), dtype="float32")
    export_onnx(model, output, with_past=with_past, opset=opset)
    data = output.with_name(output.name + ".data")
    size = output.stat().st_size + (data.stat().st_size if data.exists() else 0)
    click.echo(f"wrote {output} ({size / 2**20:.1f} MiB, opset {opset}{', with past' if with_past else ''})")


@cli.command("compile-onnx")
@click.argument("onnx_file", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="The model library (.so).")
@click.option("--target", default="cpu", show_default=True, help="Target preset (see blockffn-compile --list-targets).")
@click.option("--ffn", type=click.Choice(["sparse", "dense"]), default="sparse", show_default=True,
              help="sparse: recognise the BlockFFN layers by structure and lower them to union-sparse kernels.")
@click.option("--union-chunk", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens per union of active experts (prefill).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def compile_onnx_cmd(onnx_file, output, target, ffn, union_chunk, overwrite) -> None:
    """Compile an ONNX BlockFFN graph (e.g. from export-onnx) into a model library whose `main` keeps the graph's
    inputs and outputs; load it with tvm.runtime.load_module and tvm.relax.VirtualMachine."""
    from blockffn.compiler.onnx_import import build_onnx
    from blockffn.targets import get_target

    _claim_output(output, ".so", overwrite)
    if get_target(target).system_lib:
        raise BlockFFNError(f"compile-onnx writes shared libraries; target {target} links a static system library")
    build = build_onnx(onnx_file, target=target, ffn=ffn, union_chunk=union_chunk)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".so", dir=output.parent)
    os.close(fd)
    try:
        build.executable.export_library(tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    click.echo(f"wrote {output}: {build.layers_outlined} BlockFFN layers recognised, {build.layers_sparse} lowered "
               f"to union-sparse kernels")
    for reason in build.unmatched:
        click.echo(f"  not recognised: {reason}")
