"""`blockffn data | init | train | train-draft | eval | convert`: making, training and measuring models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from blockffn.errors import BlockFFNError
from blockffn.outputs import check_output
from blockffn.cli.base import _model_dir, cli, to_json
from blockffn.validation import (FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, Number,
                                 Range)

TRAIN_DEVICES = ("auto", "cpu", "cuda")  # as blockffn.train.device.DEVICES (not imported: it needs torch)

# option types (blockffn.validation): NaN, infinities and out-of-range values are refused while parsing (exit 2)
COUNT, COUNT0 = Number(POSITIVE_INT), Number(NON_NEGATIVE_INT)
RATE, WEIGHT = Number(POSITIVE), Number(NON_NEGATIVE)


# ---------------------------------------------------------------------------------------------------------- data
@cli.group()
def data() -> None:
    """Prepare training data (tokenizer + packed token arrays)."""


@data.command("prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output data folder.")
@click.option("--vocab-size", type=Number(Range(lo=256, integer=True)), default=4096, show_default=True,
              help="BPE vocabulary size (ignored with --tokenizer).")
@click.option("--val-fraction", type=Number(Range(0, 0.5, lo_open=True, hi_open=True)), default=0.02,
              show_default=True, help="Held-out tail of every source file.")
@click.option("--doc-split", type=click.Choice(["blank", "line", "file"]), default="blank", show_default=True,
              help="How plain-text files are cut into documents (.jsonl: one 'text' per line).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path), default=None,
              help="Reuse the tokenizer.json of this folder instead of training one.")
@click.option("--overwrite", is_flag=True, help="Replace an existing data folder (only one `data prepare` wrote).")
def data_prepare(inputs, output, vocab_size, val_fraction, doc_split, tokenizer_dir, overwrite) -> None:
    """Train a byte-level BPE on INPUTS (.txt, .jsonl, optionally .xz) and write a document-packed split."""
    from blockffn.data.prepare import prepare

    meta = prepare(list(inputs), output, vocab_size, val_fraction, doc_split, tokenizer_dir, log=click.echo,
                   overwrite=overwrite)
    click.echo(f"wrote {output}: {meta['train_tokens']} train / {meta['val_tokens']} val tokens, "
               f"vocab {meta['vocab_size']}")


# ---------------------------------------------------------------------------------------------------------- init
@cli.command("init")
@click.option("--preset", required=True, help="small, medium, large, xlarge, 3b, tiny or tiny-gqa.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--layers", type=COUNT, default=None, help="Override the number of layers (quick tests).")
@click.option("--vocab-size", type=COUNT, default=None, help="Override the vocabulary size.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="bfloat16",
              show_default=True)
@click.option("--shard-size-mb", type=COUNT, default=None,
              help="Shard weights into files of at most this size.")
@click.option("--seed", type=Number(SEED), default=0, show_default=True)
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path), default=None,
              help="Copy tokenizer files from this folder.")
@click.option("--force-active", type=Number(Range(0, 1, lo_open=True)), default=None,
              help="Benchmarks only: route exactly this fraction of the experts for every token in every layer "
                   "(e.g. 0.25; see blockffn/model/forced_routing.py). Never the default.")
@click.option("--overwrite", is_flag=True)
def init_cmd(preset, output, layers, vocab_size, dtype, shard_size_mb, seed, tokenizer_dir, force_active,
             overwrite) -> None:
    """Create a random-initialised model of an official shape, in the official HF checkpoint format."""
    from blockffn.model import BlockFFNForCausalLM, preset_config, save_model
    from blockffn.model.forced_routing import force_active as force

    check_output(output, overwrite, "model")
    cfg = preset_config(preset, num_hidden_layers=layers, vocab_size=vocab_size)
    model = BlockFFNForCausalLM(cfg).init_weights(seed)
    if force_active is not None:
        chosen = force(model, force_active)
        click.echo(f"forced routing: experts {chosen[:8]}{'...' if len(chosen) > 8 else ''} "
                   f"({len(chosen)}/{cfg.num_experts}) active for every token")
    shard = shard_size_mb * 2**20 if shard_size_mb else None
    save_model(model, output, dtype, shard, tokenizer_dir, overwrite=overwrite)
    click.echo(f"wrote {output}: {preset} preset, {cfg.num_hidden_layers} layers, "
               f"{model.num_parameters() / 1e6:.1f}M parameters ({dtype})")


# ---------------------------------------------------------------------------------------------------------- train
@cli.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="Folder written by `blockffn data prepare`.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--preset", default="tiny", show_default=True, help="Model shape (ignored when resuming).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="A config.json to train instead of a preset.")
@click.option("--layers", type=COUNT, default=None)
@click.option("--steps", type=COUNT, default=1000, show_default=True)
@click.option("--batch-size", type=COUNT, default=16, show_default=True)
@click.option("--seq-len", type=COUNT, default=256, show_default=True)
@click.option("--lr", type=RATE, default=1e-2, show_default=True, help="Peak lr (µP: matrices get lr·256/d).")
@click.option("--mup/--no-mup", default=True, show_default=True, help="µP learning-rate scaling.")
@click.option("--warmup-steps", type=COUNT0, default=50, show_default=True)
@click.option("--decay-frac", type=Number(FRACTION), default=0.2, show_default=True,
              help="WSD: final fraction decays the lr.")
@click.option("--lambda-al", type=WEIGHT, default=2e-3, show_default=True,
              help="Activation-locality weight (0 disables).")
@click.option("--lambda-cs", type=WEIGHT, default=5e-2, show_default=True,
              help="Initial chunk-sparsification weight λ0.")
@click.option("--chunk-len", type=COUNT, default=64, show_default=True, help="Chunk length of the CS loss.")
@click.option("--cs-stable-steps", type=COUNT0, default=1000, show_default=True,
              help="Steps before λ_cs starts adapting.")
@click.option("--cs-adjust-every", type=COUNT, default=100, show_default=True, help="λ_cs adjustment period.")
@click.option("--eval-every", type=COUNT, default=200, show_default=True)
@click.option("--eval-tokens", type=COUNT, default=65536, show_default=True)
@click.option("--save-every", type=COUNT0, default=500, show_default=True,
              help="Resumable checkpoint period (0: only at end).")
@click.option("--time-budget", type=RATE, default=None, help="Stop after this many seconds (lr decays to it).")
@click.option("--seed", type=Number(SEED), default=0, show_default=True)
@click.option("--threads", type=COUNT, default=None, help="torch threads per process.")
@click.option("--device", type=click.Choice(TRAIN_DEVICES), default="auto", show_default=True,
              help="auto: the GPU when torch sees one (under torchrun, GPU LOCAL_RANK), else the CPU.")
@click.option("--autocast", type=click.Choice(["auto", "none", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 on a GPU, none on the CPU (where bf16 was measured slower).")
def train_cmd(data_dir, output, preset, config_file, layers, steps, batch_size, seq_len, lr, mup, warmup_steps,
              decay_frac, lambda_al, lambda_cs, chunk_len, cs_stable_steps, cs_adjust_every, eval_every, eval_tokens,
              save_every, time_budget, seed, threads, device, autocast) -> None:
    """Train a BlockFFN with LM + activation-locality + adaptive chunk-sparsification losses.

    Resumes automatically from OUTPUT/checkpoint.  Scale out with `torchrun --nproc_per_node N -m blockffn.cli train`.
    """
    from blockffn.data.prepare import load_tokenizer
    from blockffn.model import BlockFFNConfig, preset_config
    from blockffn.train.trainer import TrainConfig, Trainer

    tok = load_tokenizer(data_dir)
    special = {"bos_token_id": tok.token_to_id("<|endoftext|>"), "eos_token_id": tok.token_to_id("<|endoftext|>"),
               "pad_token_id": tok.token_to_id("<|pad|>")}
    if config_file:
        cfg = BlockFFNConfig.load(config_file)
        if layers:
            cfg = cfg.replace(num_hidden_layers=layers)
    else:
        cfg = preset_config(preset, num_hidden_layers=layers, vocab_size=max(tok.get_vocab_size(), 1), **special)
    tc = TrainConfig(data_dir=str(data_dir), output_dir=str(output), steps=steps, batch_size=batch_size,
                     seq_len=seq_len, lr=lr, mup=mup, warmup_steps=warmup_steps, decay_frac=decay_frac,
                     lambda_al=lambda_al, lambda_cs=lambda_cs, chunk_len=chunk_len, cs_stable_steps=cs_stable_steps,
                     cs_adjust_every=cs_adjust_every, eval_every=eval_every, eval_tokens=eval_tokens,
                     save_every=save_every, time_budget=time_budget, seed=seed, threads=threads, autocast=autocast,
                     device=device)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False,
                  disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("train", total=steps, info="")

        def on_step(rec):
            bar.update(task, completed=rec["step"],
                       info=f"lm {rec['lm']:.3f} cs {rec['cs']:.3f} λcs {rec['lambda_cs']:.3f}")

        trainer = Trainer(tc, cfg, log=bar.console.print if sys.stderr.isatty() else click.echo, progress=on_step)
        result = trainer.train()
    if trainer.rank == 0:
        ev = result["eval"]
        click.echo(f"done: {result['step']} steps, {result['state']['tokens']} tokens, "
                   f"{result['state']['elapsed']:.0f}s; val ppl {ev['ppl']:.2f}, TLS {ev['tls']:.3f}, "
                   f"CLS8 {ev['cls']['8']:.3f}; model in {Path(output) / 'model'}")


# ---------------------------------------------------------------------------------------------------------- train-draft
@cli.command("train-draft")
@click.option("--target-model", "target_dir", type=click.Path(path_type=Path), default=None,
              help="Frozen target model folder (default: the bundled model).")
@click.option("--text", "texts", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Training text (.txt, .jsonl, optionally .xz): --text A [B ...] (more files may follow).")
@click.argument("more_texts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Draft folder to write.")
@click.option("--steps", type=COUNT, default=1000, show_default=True)
@click.option("--time-budget", type=RATE, default=None, help="Stop after this many minutes (lr decays to it).")
@click.option("--lr", type=RATE, default=3e-3, show_default=True, help="Peak lr (AdamW, warmup then WSD decay).")
@click.option("--batch-size", type=COUNT, default=8, show_default=True)
@click.option("--seq-len", type=COUNT, default=256, show_default=True)
@click.option("--warmup-steps", type=COUNT0, default=50, show_default=True)
@click.option("--draft-vocab-size", type=COUNT, default=None,
              help="Frequency-ranked draft vocabulary (FR-Spec); default: the target's full vocabulary.")
@click.option("--holdout-fraction", type=Number(Range(0, 0.5, hi_open=True)), default=0.02, show_default=True,
              help="Leave out this tail of every file's documents (what `data prepare` holds out).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--seed", type=Number(SEED), default=0, show_default=True)
@click.option("--threads", type=COUNT, default=None, help="torch threads.")
@click.option("--device", type=click.Choice(TRAIN_DEVICES), default="auto", show_default=True,
              help="auto: the GPU when torch sees one, else the CPU.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def train_draft_cmd(target_dir, texts, more_texts, output, steps, time_budget, lr, batch_size, seq_len, warmup_steps,
                    draft_vocab_size, holdout_fraction, dtype, seed, threads, device, overwrite) -> None:
    """Train an EAGLE draft head on a frozen target's hidden states (feature regression + target-distribution CE).

    Example: blockffn train-draft --text corpus/*.txt.xz --output draft --time-budget 20 --threads 1
    """
    from blockffn.train.draft_trainer import DraftTrainConfig, DraftTrainer

    if steps <= 0:
        raise BlockFFNError("--steps must be positive")
    tc = DraftTrainConfig(target_model=str(_model_dir(target_dir)), texts=[str(t) for t in texts + more_texts],
                          output_dir=str(output), steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                          warmup_steps=warmup_steps, draft_vocab_size=draft_vocab_size,
                          holdout_fraction=holdout_fraction,
                          time_budget=time_budget * 60 if time_budget is not None else None, dtype=dtype,
                          overwrite=overwrite, seed=seed, threads=threads, device=device)
    check_output(output, overwrite, "model")  # before the training, not after it
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]train-draft"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("train-draft", total=steps, info="")
        log = bar.console.print if sys.stderr.isatty() else click.echo

        def on_step(rec):
            bar.update(task, completed=rec["step"],
                       info=f"loss {rec['loss']:.4f} (v {rec['v']:.4f} p {rec['p']:.3f}) top-1 {rec['acc']:.3f}")
            if not sys.stderr.isatty() and (rec["step"] % 50 == 0 or rec["step"] == 1):
                click.echo(f"step {rec['step']}: loss {rec['loss']:.4f} v {rec['v']:.4f} p {rec['p']:.4f} "
                           f"top-1 {rec['acc']:.3f} lr {rec['lr']:.2e} ({rec['elapsed']:.0f}s)")

        result = DraftTrainer(tc, log=log, progress=on_step).train()
    click.echo(f"done: {result['step']} steps, {result['tokens']} tokens, {result['elapsed']:.0f}s; held-out top-1 "
               f"agreement {result['eval']['acc']:.3f}; draft in {output}")


# ---------------------------------------------------------------------------------------------------------- eval
@cli.command("eval")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder (default: the bundled model).")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path),
              help="Text to evaluate on (.txt, .jsonl, optionally .xz).")
@click.option("--seq-len", type=Number(Range(lo=2, integer=True)), default=256, show_default=True)
@click.option("--max-tokens", type=COUNT, default=None, help="Evaluate at most this many tokens.")
@click.option("--sparse", is_flag=True, help="Use the union-sparse FFN (same numbers up to rounding).")
@click.option("--quantization", type=click.Choice(["q4f16_1", "q4f32_1"]), default=None,
              help="Evaluate the PyTorch model with these group-quantized (fake-quantized) weights.")
@click.option("--artifact", "artifact_dir", type=click.Path(path_type=Path), default=None,
              help="Evaluate a compiled artifact instead: ppl/bpb through the TVM library (plain causal windows), "
                   "TLS/CLS through its weights.")
@click.option("--device", type=click.Choice(TRAIN_DEVICES), default="cpu", show_default=True,
              help="Where the PyTorch model runs (auto: the GPU when torch sees one).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model_dir, text_file, seq_len, max_tokens, sparse, quantization, artifact_dir, device, as_json) -> None:
    """Perplexity, bits per byte, TLS, CLS_s (s = 1..64) and reuse ratio on a text file.

    Example: blockffn eval --artifact dist/blockffn-tiny-q4f16_1-cpu --text heldout.txt --max-tokens 2048
    """
    from blockffn.data.prepare import load_tokenizer, pack, read_documents
    from blockffn.model import load_model
    from blockffn.train.evaluate import evaluate

    if artifact_dir and (model_dir or quantization or sparse):
        raise BlockFFNError("--artifact evaluates the compiled artifact; drop --model/--quantization/--sparse")
    source = artifact_dir if artifact_dir else _model_dir(model_dir)
    if artifact_dir:  # validate the folder before reading anything from it
        from blockffn.artifacts.reader import open_artifact

        model, eos = None, open_artifact(artifact_dir).config.eos_token_id
    else:
        model = load_model(source, dtype="float32")
        eos = model.config.eos_token_id
    tok = load_tokenizer(source)
    docs = read_documents(text_file)
    if not docs:
        raise BlockFFNError(f"{text_file}: no text found")
    n_bytes = sum(len(d.encode()) + 1 for d in docs)
    split = pack([e.ids for e in tok.encode_batch(docs)], eos)
    if artifact_dir:
        from blockffn.train.artifact_eval import evaluate_artifact

        r = evaluate_artifact(artifact_dir, split, seq_len, max_tokens, bytes_per_token=n_bytes / len(split.tokens))
    else:
        if quantization:
            from blockffn.compiler.quantization import SCHEMES, fake_quantize_model

            fake_quantize_model(model, SCHEMES[quantization])
        from blockffn.train.device import training_device

        model.to(training_device(device))
        r = evaluate(model, split, seq_len, max_tokens, bytes_per_token=n_bytes / len(split.tokens), sparse=sparse)
    model_dir = source
    if as_json:
        from blockffn.train.metrics import per_layer_json

        out = {"ppl": r["ppl"], "bpb": r["bpb"], "tls": r["tls"], "cls": r["cls"], "reuse": r["reuse"],
               "loss": r["loss"], "tokens": r["tokens"], "quantization": quantization or r.get("quantization"),
               "per_layer": per_layer_json(r["per_layer"])}
        click.echo(to_json(out))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]{model_dir}[/] on {text_file} ({r['tokens']} tokens)")
    con.print(f"ppl {r['ppl']:.3f}   bpb {r['bpb']:.4f}   TLS {r['tls']:.4f}   reuse {r['reuse']:.4f}")
    con.print("CLS: " + "  ".join(f"{s}:{v:.4f}" for s, v in r["cls"].items()))
    table = Table("layer", "TLS", "CLS8", "CLS64", "reuse")
    pl = r["per_layer"]
    for i in range(len(pl["tls"])):
        table.add_row(str(i), f"{pl['tls'][i]:.4f}", f"{pl['cls']['8'][i]:.4f}", f"{pl['cls']['64'][i]:.4f}",
                      f"{pl['reuse'][i]:.4f}")
    con.print(table)


# ---------------------------------------------------------------------------------------------------------- convert
@cli.command("convert")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="bfloat16",
              show_default=True)
@click.option("--shard-size-mb", type=COUNT, default=None)
@click.option("--overwrite", is_flag=True)
def convert_cmd(model_dir, output, dtype, shard_size_mb, overwrite) -> None:
    """Validate a checkpoint (any supported layout) and re-write it as official-format safetensors."""
    from blockffn.model import load_model, save_model

    model_dir = _model_dir(model_dir)
    if model_dir.resolve().is_relative_to(Path(output).resolve()):  # the rename would drop draft/, the model card
        raise BlockFFNError(f"-o {output} would replace the input model {model_dir}; write the converted model to "
                            f"another folder")
    check_output(output, overwrite, "model")
    model = load_model(model_dir, dtype="float32")
    shard = shard_size_mb * 2**20 if shard_size_mb else None
    save_model(model, output, dtype, shard, tokenizer_dir=model_dir, overwrite=overwrite)
    click.echo(f"wrote {output} ({dtype})")
