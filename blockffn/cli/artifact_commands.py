"""`blockffn compile` / `blockffn-compile`, `blockffn inspect | verify`: building and checking artifacts."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from blockffn.cli.base import _model_dir, cli, quiet_logs, to_json
from blockffn.validation import NON_NEGATIVE_INT, POSITIVE_INT, Number


# ---------------------------------------------------------------------------------------------------------- compile
def _compile_options(f):
    opts = [
        click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
                     help="Model folder (default: the bundled model)."),
        click.option("--target", default="cpu", show_default=True, help="Target preset (see --list-targets)."),
        click.option("--dtype", "--quantization", "quantization",
                     type=click.Choice(["q0f32", "q0f16", "q0bf16", "q4f16_1", "q4f32_1"]), default="q0f32",
                     show_default=True, help="Weight storage / compute dtype; q4*: 4-bit group quantization "
                                             "(MLC q_weight/q_scale) with an fp16 / fp32 scale and compute dtype."),
        click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
                     help="Artifact folder (default: dist/<model>-<dtype>-<target>), or a library file NAME.so|.tar|.dylib "
                          "for the model library alone (.tar: objects to link on the device)."),
        click.option("--context-window", type=Number(POSITIVE_INT), default=None, help="Max tokens per sequence."),
        click.option("--prefill-chunk", type=Number(POSITIVE_INT), default=None,
                     help="Max tokens per prefill call."),
        click.option("--max-batch-size", type=Number(POSITIVE_INT), default=8, show_default=True),
        click.option("--arch", default=None, help="CUDA SM for cuda targets, e.g. sm_87 (default: the preset's)."),
        click.option("--ffn", type=click.Choice(["auto", "dense", "sparse"]), default="auto", show_default=True,
                     help="BlockFFN lowering.  sparse: only the union of active experts (decode/verify: over the "
                          "call; prefill: per --union-chunk tokens); auto: the same, and the runtime runs prefill "
                          "chunked-union or dense, whichever it measures faster on the device; dense: every expert. "
                          "Sparse builds also carry dense twins (<function>_dense)."),
        click.option("--union-chunk", type=Number(POSITIVE_INT), default=16, show_default=True,
                     help="Prefill tokens per union of active experts (chunked-union prefill)."),
        click.option("--draft", default="auto", show_default=True,
                     help="EAGLE draft head folder to build into ARTIFACT/draft (auto: MODEL/draft if present; "
                          "none: no draft)."),
        click.option("--debug-counts", is_flag=True,
                     help="Also export *_with_stats functions returning per-layer active-expert counts (the runtime "
                          "and `blockffn bench` then report measured TLS and union sizes)."),
        click.option("--tune-trials", type=Number(NON_NEGATIVE_INT), default=0, show_default=True,
                     help="MetaSchedule trials per static-shape dense kernel (decode projections, router, lm-head); "
                          "measures on this machine, so the target's device must be here. 0: no tuning."),
        click.option("--tune-db", type=click.Path(path_type=Path), default=None,
                     help="Tuning database folder: tuned kernels are reused from it and new ones added; alone "
                          "(--tune-trials 0) it is only applied. Default with --tune-trials: one per target under "
                          "~/.cache/blockffn/tuning."),
        click.option("--cuda-graph", is_flag=True,
                     help="CUDA targets: capture each step's kernels (between KV-cache calls) as CUDA graphs and "
                          "replay them, removing most per-kernel launch cost (BlockFFN layers are inlined first)."),
        click.option("--dump-ir", type=click.Path(path_type=Path), default=None,
                     help="Write the module after every pipeline phase (attach, graph, dispatch, legalize, schedule, "
                          "lower) as TVMScript into DIR/model/NN-<phase>.py (and DIR/draft/ for the draft)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output folder."),
        click.option("--list-targets", is_flag=True, help="Print the target presets and exit."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run_compile(model_dir, target, quantization, output, context_window, prefill_chunk, max_batch_size, ffn,
                 union_chunk, arch, draft, debug_counts, tune_trials, tune_db, cuda_graph, dump_ir, overwrite,
                 list_targets) -> None:
    from blockffn.targets import list_targets as presets

    if list_targets:
        for p in presets():
            click.echo(f"{p.name:<10} {p.description}\n           target {json.dumps(p.target)}\n"
                       f"           host {p.host_triple}, output {p.lib_suffix}, needs {p.toolchain}")
        return
    from blockffn.compiler.compile import CompileOptions, compile_model

    opts = CompileOptions(model_dir=_model_dir(model_dir), target=target, quantization=quantization, output=output,
                          context_window=context_window, prefill_chunk=prefill_chunk, max_batch_size=max_batch_size,
                          overwrite=overwrite, ffn=ffn, union_chunk=union_chunk, arch=arch, draft=draft,
                          debug_counts=debug_counts, tune_trials=tune_trials, tune_db=tune_db, cuda_graph=cuda_graph,
                          dump_ir=dump_ir)
    r = compile_model(opts)
    peak = max(r["peak_rss_mb"].values(), default=0)
    if "deploy" in r:  # library-only output
        click.echo(f"wrote {r['output']} (model library only, {sum(r['seconds'].values()):.1f} s, peak RSS "
                   f"{peak:.0f} MiB; how to link and load it: {r['deploy']})")
        return
    mb = 1 / 2**20
    click.echo("memory:")
    click.echo(f"  params          {r['param_bytes'] * mb:9.2f} MiB")
    click.echo(f"  KV cache        {r['kv_cache_bytes_per_sequence'] * mb:9.2f} MiB per full-context sequence")
    for fn in ("prefill", "decode", "batch_prefill", "batch_decode", "batch_verify"):
        click.echo(f"  temp {fn:<14} {r['memory_usage'].get(fn, 0) * mb:7.2f} MiB")
    click.echo(f"wrote {r['output']} (library {r['library']}, {sum(r['seconds'].values()):.1f} s, peak RSS "
               f"{peak:.0f} MiB)")


COMPILE_HELP = """Compile a BlockFFN model with TVM into an MLC-layout artifact folder: model library, weights
(as `blockffn convert-weight` writes them) and mlc-chat-config.json (as `blockffn gen-config` does); or, with
-o NAME.so|.tar, the model library alone, from config.json only (--model may also be an artifact folder or an
mlc-chat-config.json).

\b
Memory: the library build reads only config.json (peak RSS is the TVM build: about 1.5-3 GiB for the 2.8B
shape); an artifact folder also streams the weights one tensor at a time (peak about the largest tensor in fp32
plus one 32 MiB shard); a model with a draft head is loaded whole to build the draft. Each phase prints its wall
time and the peak RSS so far."""


@cli.command("compile", help=COMPILE_HELP)
@_compile_options
def compile_cmd(**kwargs) -> None:
    _run_compile(**kwargs)


@click.command("blockffn-compile", context_settings={"help_option_names": ["-h", "--help"]}, help=COMPILE_HELP)
@_compile_options
def compile_entry(**kwargs) -> None:
    _run_compile(**kwargs)


_DTYPES = click.Choice(["q0f32", "q0f16", "q0bf16", "q4f16_1", "q4f32_1"])


def _report(r: dict, what: str) -> None:
    peak = max(r["peak_rss_mb"].values(), default=0)
    click.echo(f"wrote {what} into {r['output']} ({sum(r['seconds'].values()):.1f} s, peak RSS {peak:.0f} MiB)")


@cli.command("convert-weight")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder (default: the bundled model): single or sharded safetensors, bf16/fp16/fp32.")
@click.option("--dtype", "--quantization", "quantization", type=_DTYPES, default="q0f32", show_default=True)
@click.option("--target", default=None, help="Accepted for MLC compatibility; weights do not depend on the target.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Artifact folder.")
@click.option("--overwrite", is_flag=True, help="Replace weights already in the folder (other files are kept).")
@click.option("--json", "as_json", is_flag=True, help="Print the report (times, peak RSS per phase) as JSON.")
def convert_weight_cmd(model_dir, quantization, target, output, overwrite, as_json) -> None:
    """Write an artifact's weights (params_shard_*.bin, tensor-cache.json, ndarray-cache.json, tokenizer files) in
    the layout and quantization the model library of --dtype expects, without building the library.

    \b
    Memory: streams one tensor at a time from (sharded) safetensors: peak RSS is about the runtime's imports
    (~0.5 GiB) plus the largest tensor in fp32 plus one 32 MiB shard, never the model (the 2.8B model: under
    2 GiB). pytorch_model.bin checkpoints are memory-mapped instead."""
    from blockffn.compiler.convert_weight import convert_weight
    from blockffn.targets import get_target

    if target is not None:
        get_target(target)  # an unknown target is still an error
    with quiet_logs() if as_json else contextlib.nullcontext():
        r = convert_weight(_model_dir(model_dir), quantization, output, overwrite)
    if as_json:
        click.echo(to_json(r))
    else:
        _report(r, f"{quantization} weights ({r['param_bytes'] / 2**20:.1f} MiB in {r['shards']} shards)")


@cli.command("gen-config")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder (default: the bundled model); only config.json and tokenizer files are read.")
@click.option("--dtype", "--quantization", "quantization", type=_DTYPES, default="q0f32", show_default=True)
@click.option("--context-window", type=Number(POSITIVE_INT), default=None, help="Max tokens per sequence.")
@click.option("--prefill-chunk", type=Number(POSITIVE_INT), default=None, help="Max tokens per prefill call.")
@click.option("--max-batch-size", type=Number(POSITIVE_INT), default=8, show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Artifact folder.")
@click.option("--overwrite", is_flag=True, help="Replace an mlc-chat-config.json already in the folder.")
def gen_config_cmd(model_dir, quantization, context_window, prefill_chunk, max_batch_size, output, overwrite) -> None:
    """Write mlc-chat-config.json (model config, sizes, conversation template) and the tokenizer files of an
    artifact folder.  Memory: reads config.json only (well under 1 GiB)."""
    from blockffn.compiler.gen_config import gen_config

    with quiet_logs():
        r = gen_config(_model_dir(model_dir), quantization, output, context_window, prefill_chunk, max_batch_size,
                       overwrite)
    _report(r, "mlc-chat-config.json")


# ---------------------------------------------------------------------------------------------------------- inspect
@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(artifact, as_json) -> None:
    """Print an artifact's manifest, library functions, metadata and sizes (read from its files; the library is
    checked against the manifest's sha256 but never loaded, so any target's artifact can be inspected anywhere)."""
    from blockffn.runtime.inspect import describe

    info = describe(artifact)
    if as_json:
        click.echo(to_json(info, indent=2))
        return
    m = info["manifest"]
    source = m.get("source") if isinstance(m.get("source"), dict) else {}
    click.echo(f"artifact   {artifact}")
    click.echo(f"model      {source.get('path', '?')} (sha256 {str(source.get('sha256', '?'))[:16]}…)")
    click.echo(f"target     {m['target']['name']} {json.dumps(m['target']['tvm_target'])}  quantization "
               f"{m['quantization']}")
    click.echo("versions   " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    click.echo(f"context    {m.get('context_window_size', '?')} tokens, prefill chunk "
               f"{m.get('prefill_chunk_size', '?')}, max batch {m.get('max_batch_size', '?')}")
    click.echo(f"passes     {' -> '.join(map(str, m.get('passes') or []))}")
    click.echo(f"functions  {', '.join(map(str, info['functions']))}")
    click.echo(f"library    {m['library']} ({info['sizes']['library']} bytes, sha256 {m['library_sha256'][:16]}…)")
    click.echo("sizes      " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in info["sizes"].items()))
    md = info["metadata"]
    click.echo(f"metadata   kv_cache {json.dumps(md.get('kv_cache'))}, {len(md['params'])} params")
    usage = md["memory_usage"] if isinstance(md["memory_usage"], dict) else {}
    click.echo("memory     " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in usage.items()
                                         if isinstance(v, (int, float)) and v))


# ---------------------------------------------------------------------------------------------------------- verify
@cli.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
def verify_cmd(artifact) -> None:
    """Check an artifact for its target: architecture, symbols, kernel format, metadata vs weights, versions."""
    from blockffn.artifacts.verify import verify_artifact

    for line in verify_artifact(artifact):
        click.echo(line)
    click.echo(f"{artifact}: verified")
