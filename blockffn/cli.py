"""The `blockffn` command line.  Every command defaults to the bundled tiny model (`blockffn.default_model_path()`).

Commands only parse flags, call into the library and print; errors the user can fix (`BlockFFNError`) become one
line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from blockffn import __version__, default_model_path
from blockffn.errors import BlockFFNError, CheckpointError


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


# ---------------------------------------------------------------------------------------------------------- data
@cli.group()
def data() -> None:
    """Prepare training data (tokenizer + packed token arrays)."""


@data.command("prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Output data folder.")
@click.option("--vocab-size", default=4096, show_default=True, help="BPE vocabulary size (ignored with --tokenizer).")
@click.option("--val-fraction", default=0.02, show_default=True, help="Held-out tail of every source file.")
@click.option("--doc-split", type=click.Choice(["blank", "line", "file"]), default="blank", show_default=True,
              help="How plain-text files are cut into documents (.jsonl: one 'text' per line).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path), default=None,
              help="Reuse the tokenizer.json of this folder instead of training one.")
def data_prepare(inputs, output, vocab_size, val_fraction, doc_split, tokenizer_dir) -> None:
    """Train a byte-level BPE on INPUTS (.txt, .jsonl, optionally .xz) and write a document-packed split."""
    from blockffn.data.prepare import prepare

    meta = prepare(list(inputs), output, vocab_size, val_fraction, doc_split, tokenizer_dir, log=click.echo)
    click.echo(f"wrote {output}: {meta['train_tokens']} train / {meta['val_tokens']} val tokens, "
               f"vocab {meta['vocab_size']}")


# ---------------------------------------------------------------------------------------------------------- init
@cli.command("init")
@click.option("--preset", required=True, help="small, medium, large, xlarge, 3b, tiny or tiny-gqa.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--layers", type=int, default=None, help="Override the number of layers (quick tests).")
@click.option("--vocab-size", type=int, default=None, help="Override the vocabulary size.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="bfloat16",
              show_default=True)
@click.option("--shard-size-mb", type=int, default=None, help="Shard weights into files of at most this size.")
@click.option("--seed", default=0, show_default=True)
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path), default=None,
              help="Copy tokenizer files from this folder.")
@click.option("--overwrite", is_flag=True)
def init_cmd(preset, output, layers, vocab_size, dtype, shard_size_mb, seed, tokenizer_dir, overwrite) -> None:
    """Create a random-initialised model of an official shape, in the official HF checkpoint format."""
    from blockffn.model import BlockFFNForCausalLM, preset_config, save_model

    cfg = preset_config(preset, num_hidden_layers=layers, vocab_size=vocab_size)
    model = BlockFFNForCausalLM(cfg).init_weights(seed)
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
@click.option("--layers", type=int, default=None)
@click.option("--steps", default=1000, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--lr", default=1e-2, show_default=True, help="Peak lr (µP: matrices get lr·256/d).")
@click.option("--mup/--no-mup", default=True, show_default=True, help="µP learning-rate scaling.")
@click.option("--warmup-steps", default=50, show_default=True)
@click.option("--decay-frac", default=0.2, show_default=True, help="WSD: final fraction decays the lr.")
@click.option("--lambda-al", default=2e-3, show_default=True, help="Activation-locality weight (0 disables).")
@click.option("--lambda-cs", default=5e-2, show_default=True, help="Initial chunk-sparsification weight λ0.")
@click.option("--chunk-len", default=64, show_default=True, help="Chunk length of the CS loss.")
@click.option("--cs-stable-steps", default=1000, show_default=True, help="Steps before λ_cs starts adapting.")
@click.option("--cs-adjust-every", default=100, show_default=True, help="λ_cs adjustment period.")
@click.option("--eval-every", default=200, show_default=True)
@click.option("--eval-tokens", default=65536, show_default=True)
@click.option("--save-every", default=500, show_default=True, help="Resumable checkpoint period (0: only at end).")
@click.option("--time-budget", type=float, default=None, help="Stop after this many seconds (lr decays to it).")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads per process.")
@click.option("--autocast", type=click.Choice(["none", "bf16"]), default="none", show_default=True)
def train_cmd(data_dir, output, preset, config_file, layers, steps, batch_size, seq_len, lr, mup, warmup_steps,
              decay_frac, lambda_al, lambda_cs, chunk_len, cs_stable_steps, cs_adjust_every, eval_every, eval_tokens,
              save_every, time_budget, seed, threads, autocast) -> None:
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
                     save_every=save_every, time_budget=time_budget, seed=seed, threads=threads, autocast=autocast)
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
@click.option("--steps", default=1000, show_default=True)
@click.option("--time-budget", type=float, default=None, help="Stop after this many minutes (lr decays to it).")
@click.option("--lr", default=3e-3, show_default=True, help="Peak lr (AdamW, warmup then WSD decay).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--warmup-steps", default=50, show_default=True)
@click.option("--draft-vocab-size", type=int, default=None,
              help="Frequency-ranked draft vocabulary (FR-Spec); default: the target's full vocabulary.")
@click.option("--holdout-fraction", default=0.02, show_default=True,
              help="Leave out this tail of every file's documents (what `data prepare` holds out).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def train_draft_cmd(target_dir, texts, more_texts, output, steps, time_budget, lr, batch_size, seq_len, warmup_steps,
                    draft_vocab_size, holdout_fraction, dtype, seed, threads, overwrite) -> None:
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
                          overwrite=overwrite, seed=seed, threads=threads)
    if Path(output).exists() and not overwrite and any(Path(output).iterdir()):
        raise CheckpointError(f"{output}: output folder exists and is not empty (pass --overwrite)")
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
@click.option("--seq-len", default=256, show_default=True)
@click.option("--max-tokens", type=int, default=None, help="Evaluate at most this many tokens.")
@click.option("--sparse", is_flag=True, help="Use the union-sparse FFN (same numbers up to rounding).")
@click.option("--quantization", type=click.Choice(["q4f16_1", "q4f32_1"]), default=None,
              help="Evaluate the PyTorch model with these group-quantized (fake-quantized) weights.")
@click.option("--artifact", "artifact_dir", type=click.Path(path_type=Path), default=None,
              help="Evaluate a compiled artifact instead: ppl/bpb through the TVM library (plain causal windows), "
                   "TLS/CLS through its weights.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model_dir, text_file, seq_len, max_tokens, sparse, quantization, artifact_dir, as_json) -> None:
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
        from blockffn.runtime.artifact_eval import evaluate_artifact

        r = evaluate_artifact(artifact_dir, split, seq_len, max_tokens, bytes_per_token=n_bytes / len(split.tokens))
    else:
        if quantization:
            from blockffn.compiler.quantization import SCHEMES, fake_quantize_model

            fake_quantize_model(model, SCHEMES[quantization])
        r = evaluate(model, split, seq_len, max_tokens, bytes_per_token=n_bytes / len(split.tokens), sparse=sparse)
    model_dir = source
    if as_json:
        out = {"ppl": r["ppl"], "bpb": r["bpb"], "tls": r["tls"], "cls": r["cls"], "reuse": r["reuse"],
               "loss": r["loss"], "tokens": r["tokens"], "quantization": quantization or r.get("quantization"),
               "per_layer": {k: ({s: _floats(v2) for s, v2 in v.items()} if isinstance(v, dict) else _floats(v))
                             for k, v in r["per_layer"].items()}}
        click.echo(json.dumps(out))
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


# ---------------------------------------------------------------------------------------------------------- generate
def _sampling_options(f):
    opts = [
        click.option("--max-tokens", default=64, show_default=True),
        click.option("--greedy", is_flag=True, help="Argmax decoding (overrides temperature/top-p)."),
        click.option("--temperature", default=0.8, show_default=True),
        click.option("--top-p", default=0.95, show_default=True),
        click.option("--repetition-penalty", default=1.0, show_default=True,
                     help="> 1 discourages repeating generated tokens (compiled artifacts)."),
        click.option("--stop", "stop", multiple=True, help="Stop string (repeatable; compiled artifacts)."),
        click.option("--seed", default=0, show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _speculation_options(default_mode: str):
    return lambda f: _add_speculation_options(f, default_mode)


def _add_speculation_options(f, default_mode: str):
    opts = [
        click.option("--draft", "draft_dir", type=click.Path(path_type=Path), default=None,
                     help="Draft: an EAGLE head (ARTIFACT/draft is the default with --artifact; a MODEL/draft "
                          "folder with --model) or another compiled model artifact for chain drafts."),
        click.option("--speculative", type=click.Choice(["auto", "off", "chain", "tree"]), default=default_mode,
                     show_default=default_mode is not None,
                     help=("(default: auto with --draft, else off) " if default_mode is None else "")
                     + "auto: chains or EAGLE-2 trees with an EAGLE draft (whichever measures faster, plain decoding "
                       "when neither wins), chains with a draft model.  Sampled output is then reproducible in "
                       "distribution, not token for token (the plans follow measured timings)."),
        click.option("--draft-len", default=0, show_default=True,
                     help="Chain length (0: chosen each round from measured costs and acceptance)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _generation_params(max_tokens, greedy, temperature, top_p, repetition_penalty, stop, seed, **extra):
    from blockffn.runtime.sampling import GenerationParams

    if max_tokens <= 0:
        raise BlockFFNError("--max-tokens must be positive")
    if repetition_penalty <= 0:
        raise BlockFFNError("--repetition-penalty must be positive")
    return GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, greedy=greedy, seed=seed,
                            repetition_penalty=repetition_penalty, stop=tuple(stop), **extra)


def _artifact(path, device: str) -> Path:
    """The given artifact, or the bundled model compiled for the device (once; kept in the user cache)."""
    if path is not None:
        return Path(path)
    from blockffn import default_artifact_path

    out = default_artifact_path(device)
    if not (out / "blockffn-manifest.json").exists():
        from blockffn.compiler.compile import CompileOptions, compile_model

        click.echo(f"compiling the bundled model for {device} (once; cached in {out})", err=True)
        compile_model(CompileOptions(model_dir=default_model_path(), target=device, output=out, overwrite=True),
                      log=lambda *_: None)
    return out


@cli.command("generate")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder run with PyTorch (default: the bundled model).")
@click.option("--artifact", "artifact_dir", type=click.Path(path_type=Path), default=None,
              help="Compiled artifact folder run with the TVM runtime (instead of --model).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Runtime device for --artifact.")
@click.option("--prompt", required=True)
@_sampling_options
@click.option("--sparse", is_flag=True, help="Union-sparse FFN in the PyTorch model.")
@click.option("--ffn", type=click.Choice(["auto", "sparse", "dense"]), default="auto", show_default=True,
              help="--artifact: as compiled (auto: prefill runs chunked-union or dense, whichever measured "
                   "faster here), always the sparse lowering, or the dense twins (same weights).")
@_speculation_options(None)
@click.option("--json", "as_json", is_flag=True, help='Print {"tokens": [...], "text": "...", "tok_per_s": ...}.')
def generate_cmd(model_dir, artifact_dir, device, prompt, sparse, ffn, draft_dir, speculative, draft_len, as_json,
                 **sampling) -> None:
    """Generate text from a prompt, with PyTorch (--model) or a compiled artifact (--artifact); speculative decoding
    with a draft is lossless (same tokens when greedy, same distribution when sampling)."""
    params = _generation_params(**sampling)
    if speculative is None:  # plain decoding (seed-reproducible) unless a draft is named
        speculative = "auto" if draft_dir else "off"
    if model_dir and artifact_dir:
        raise BlockFFNError("give either --model or --artifact, not both")
    if draft_len < 0:
        raise BlockFFNError("--draft-len must be >= 0")
    if artifact_dir:
        from blockffn.runtime.session import open_generator

        gen = open_generator(artifact_dir, device, draft_dir, speculative, draft_len, ffn)
        stream = None if as_json else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        if stream:
            stream(prompt)
        r = gen.generate(gen.engine.tokenizer.encode(prompt).ids, params, on_text=stream)
        out = {"tokens": r.tokens, "text": r.text, "tok_per_s": r.tok_per_s, "prefill_tok_per_s": r.prefill_tok_per_s,
               "stop_reason": r.stop_reason, "speculative": gen.spec.mode}
        if r.accepted:
            out["mean_accepted"] = r.mean_accepted
        m = gen.engine.art.manifest
        backend = f"TVM {m['target']['name']} {m['quantization']}, speculative {gen.spec.mode}" + (
            f" ({r.mean_accepted:.2f} tokens per verify, {r.plain_steps} plain steps)" if r.accepted else "")
    else:
        out, backend = _generate_pytorch(model_dir, prompt, params, sparse, draft_dir, speculative, draft_len)
    if as_json:
        click.echo(json.dumps(out))
    else:
        if not artifact_dir:
            click.echo(prompt + out["text"], nl=False)
        click.echo("")
        click.echo(f"[{len(out['tokens'])} tokens, {out['tok_per_s']:.1f} tok/s, {backend}]", err=True)


def _generate_pytorch(model_dir, prompt, params, sparse, draft_dir, speculative, draft_len):
    from blockffn.data.prepare import load_tokenizer
    from blockffn.model import load_model
    from blockffn.model.generate import generate

    model_dir = _model_dir(model_dir)
    model = load_model(model_dir, dtype="float32")
    tok = load_tokenizer(model_dir)
    ids = tok.encode(prompt).ids
    if draft_dir and speculative != "off":
        from blockffn.model.draft import load_draft
        from blockffn.model.spec_generate import SpecParams, speculative_generate

        mode = "tree" if speculative == "auto" else speculative
        draft = load_draft(draft_dir, target=model)
        r = speculative_generate(model, draft, ids, params, SpecParams(mode=mode, chain_len=draft_len or 4),
                                 sparse=sparse)
        backend = f"PyTorch eager, EAGLE {mode}, {r['mean_accepted']:.2f} tokens per verify"
    else:
        r = generate(model, ids, params, sparse=sparse)
        backend = "PyTorch eager"
    out = {"tokens": r["tokens"], "text": tok.decode(r["tokens"]), "tok_per_s": r["tok_per_s"]}
    if "mean_accepted" in r:
        out["mean_accepted"] = r["mean_accepted"]
    return out, backend


@cli.command("chat")
@click.option("--artifact", "artifact_dir", type=click.Path(path_type=Path), default=None,
              help="Compiled artifact (default: the bundled model compiled for --device, cached).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@_sampling_options
@_speculation_options("auto")
def chat_cmd(artifact_dir, device, draft_dir, speculative, draft_len, **sampling) -> None:
    """Interactive chat: /reset clears the conversation, /stats shows speeds, /exit leaves; Ctrl-C stops a reply."""
    from blockffn.runtime.chat import ChatSession

    params = _generation_params(**sampling)
    from blockffn.runtime.session import open_generator

    gen = open_generator(_artifact(artifact_dir, device), device, draft_dir, speculative, draft_len)
    ChatSession(gen, params).repl()


@cli.command("bench")
@click.option("--artifact", "artifact_dir", type=click.Path(path_type=Path), default=None,
              help="Compiled artifact (default: the bundled model compiled for --device, cached).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--draft", "draft_dir", type=click.Path(path_type=Path), default=None,
              help="Draft (default: ARTIFACT/draft when present).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="One prompt per line (default: openings of bundled held-out documents).")
@click.option("--max-tokens", default=64, show_default=True, help="Generated tokens per prompt.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the numbers here.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, help="Bar chart PNG (matplotlib).")
def bench_cmd(artifact_dir, device, draft_dir, prompts_file, max_tokens, json_out, plot_out) -> None:
    """Decode/prefill tok/s for dense-AR, sparse-AR, dense-spec, sparse-spec (same weights), accepted length, and
    achieved bandwidth vs a bandwidth figure measured on the same device."""
    from blockffn.runtime.bench import plot, run_bench

    prompts = None
    if prompts_file:
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise BlockFFNError(f"{prompts_file}: no prompts")
    art = _artifact(artifact_dir, device)
    click.echo(f"bench {art} on {device}")
    r = run_bench(art, device, draft_dir, prompts, max_tokens, log=click.echo)
    click.echo(f"  bandwidth {r['bandwidth_gbs']:.1f} GB/s measured; dense-AR streams {r['achieved_gbs']:.2f} GB/s of "
               f"weights = {r['roofline_fraction']:.2f} of it")
    for name, x in r["speedup_vs_dense_ar"].items():
        click.echo(f"  {name:<12} {x:5.2f}x dense-AR")
    if json_out:
        Path(json_out).write_text(json.dumps(r, indent=2) + "\n")
    if plot_out:
        plot(r, plot_out)


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
        click.option("--context-window", type=int, default=None, help="Max tokens per sequence."),
        click.option("--prefill-chunk", type=int, default=None, help="Max tokens per prefill call."),
        click.option("--max-batch-size", type=int, default=8, show_default=True),
        click.option("--arch", default=None, help="CUDA SM for cuda targets, e.g. sm_87 (default: the preset's)."),
        click.option("--ffn", type=click.Choice(["auto", "dense", "sparse"]), default="auto", show_default=True,
                     help="BlockFFN lowering.  sparse: only the union of active experts (decode/verify: over the "
                          "call; prefill: per --union-chunk tokens); auto: the same, and the runtime runs prefill "
                          "chunked-union or dense, whichever it measures faster on the device; dense: every expert. "
                          "Sparse builds also carry dense twins (<function>_dense)."),
        click.option("--union-chunk", type=int, default=16, show_default=True,
                     help="Prefill tokens per union of active experts (chunked-union prefill)."),
        click.option("--draft", default="auto", show_default=True,
                     help="EAGLE draft head folder to build into ARTIFACT/draft (auto: MODEL/draft if present; "
                          "none: no draft)."),
        click.option("--debug-counts", is_flag=True,
                     help="Also export *_with_stats functions returning per-layer active-expert counts (the runtime "
                          "and `blockffn bench` then report measured TLS and union sizes)."),
        click.option("--tune-trials", type=int, default=0, show_default=True,
                     help="MetaSchedule trials per static-shape dense kernel (decode projections, router, lm-head); "
                          "measures on this machine, so the target's device must be here. 0: no tuning."),
        click.option("--tune-db", type=click.Path(path_type=Path), default=None,
                     help="Tuning database folder: tuned kernels are reused from it and new ones added; alone "
                          "(--tune-trials 0) it is only applied. Default with --tune-trials: one per target under "
                          "~/.cache/blockffn/tuning."),
        click.option("--overwrite", is_flag=True, help="Replace an existing output folder."),
        click.option("--list-targets", is_flag=True, help="Print the target presets and exit."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _run_compile(model_dir, target, quantization, output, context_window, prefill_chunk, max_batch_size, ffn,
                 union_chunk, arch, draft, debug_counts, tune_trials, tune_db, overwrite, list_targets) -> None:
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
                          debug_counts=debug_counts, tune_trials=tune_trials, tune_db=tune_db)
    r = compile_model(opts, log=click.echo)
    if "deploy" in r:  # library-only output
        click.echo(f"wrote {r['output']} (model library only; how to link and load it: {r['deploy']})")
        return
    mb = 1 / 2**20
    click.echo("memory:")
    click.echo(f"  params          {r['param_bytes'] * mb:9.2f} MiB")
    click.echo(f"  KV cache        {r['kv_cache_bytes_per_sequence'] * mb:9.2f} MiB per full-context sequence")
    for fn in ("prefill", "decode", "batch_prefill", "batch_decode", "batch_verify"):
        click.echo(f"  temp {fn:<14} {r['memory_usage'].get(fn, 0) * mb:7.2f} MiB")
    click.echo(f"wrote {r['output']} (library {r['library']}, {sum(r['seconds'].values()):.1f} s)")


@cli.command("compile")
@_compile_options
def compile_cmd(**kwargs) -> None:
    """Compile a model into an MLC-layout artifact folder (same as blockffn-compile)."""
    _run_compile(**kwargs)


@click.command("blockffn-compile", context_settings={"help_option_names": ["-h", "--help"]})
@_compile_options
def compile_entry(**kwargs) -> None:
    """Compile a BlockFFN model with TVM into an MLC-layout artifact folder."""
    _run_compile(**kwargs)


# ---------------------------------------------------------------------------------------------------------- inspect
@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(artifact, as_json) -> None:
    """Print an artifact's manifest, library functions, metadata and sizes."""
    from blockffn.runtime.inspect import describe

    info = describe(artifact)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    m = info["manifest"]
    click.echo(f"artifact   {artifact}")
    click.echo(f"model      {m['source']['path']} (sha256 {m['source']['sha256'][:16]}…)")
    click.echo(f"target     {m['target']['name']} {json.dumps(m['target']['tvm_target'])}  quantization "
               f"{m['quantization']}")
    click.echo(f"versions   " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    click.echo(f"context    {m['context_window_size']} tokens, prefill chunk {m['prefill_chunk_size']}, "
               f"max batch {m['max_batch_size']}")
    click.echo(f"passes     {' -> '.join(m['passes'])}")
    click.echo(f"functions  {', '.join(info['functions'])}")
    click.echo("sizes      " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in info["sizes"].items()))
    md = info["metadata"]
    click.echo(f"metadata   kv_cache {json.dumps(md['kv_cache'])}, {len(md['params'])} params")
    click.echo("memory     " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in md["memory_usage"].items() if v))


# ---------------------------------------------------------------------------------------------------------- verify
@cli.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
def verify_cmd(artifact) -> None:
    """Check an artifact for its target: architecture, symbols, kernel format, metadata vs weights, versions."""
    from blockffn.artifacts.verify import verify_artifact

    for line in verify_artifact(artifact):
        click.echo(line)
    click.echo(f"{artifact}: verified")

# ---------------------------------------------------------------------------------------------------------- convert
@cli.command("convert")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="bfloat16",
              show_default=True)
@click.option("--shard-size-mb", type=int, default=None)
@click.option("--overwrite", is_flag=True)
def convert_cmd(model_dir, output, dtype, shard_size_mb, overwrite) -> None:
    """Validate a checkpoint (any supported layout) and re-write it as official-format safetensors."""
    from blockffn.model import load_model, save_model

    model_dir = _model_dir(model_dir)
    model = load_model(model_dir, dtype="float32")
    shard = shard_size_mb * 2**20 if shard_size_mb else None
    save_model(model, output, dtype, shard, tokenizer_dir=model_dir, overwrite=overwrite)
    click.echo(f"wrote {output} ({dtype})")


def _run(command: click.Command, argv, prog_name: str) -> None:
    """Run a Click command; user errors become one line on stderr and a non-zero exit."""
    start = time.time()
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        _echo_err("aborted")
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except BlockFFNError as e:
        _echo_err(str(e))
        sys.exit(1)
    except KeyboardInterrupt:
        _echo_err(f"interrupted after {time.time() - start:.0f}s")
        sys.exit(130)


def main(argv=None) -> None:
    _run(cli, argv, "blockffn")


def compile_main(argv=None) -> None:
    _run(compile_entry, argv, "blockffn-compile")


if __name__ == "__main__":
    main()
