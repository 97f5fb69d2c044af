"""`blockffn generate | chat | bench`: running a model (PyTorch reference or a compiled artifact)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click

from blockffn import default_model_path
from blockffn.errors import BlockFFNError
from blockffn.cli.base import _model_dir, cli, quiet_logs, to_json
from blockffn.validation import (NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, SEED, TOP_P, Number,
                                 OptionError, utf8_text, writable_file)


# ---------------------------------------------------------------------------------------------------------- generate
def _sampling_options(f):
    opts = [
        click.option("--max-tokens", type=Number(POSITIVE_INT), default=64, show_default=True),
        click.option("--greedy", is_flag=True, help="Argmax decoding (overrides temperature/top-p)."),
        click.option("--temperature", type=Number(NON_NEGATIVE), default=0.8, show_default=True,
                     help="0: greedy."),
        click.option("--top-p", type=Number(TOP_P), default=0.95, show_default=True),
        click.option("--repetition-penalty", type=Number(POSITIVE), default=1.0, show_default=True,
                     help="> 1 discourages repeating generated tokens (compiled artifacts)."),
        click.option("--stop", "stop", multiple=True, callback=utf8_text,
                     help="Stop string (repeatable; compiled artifacts)."),
        click.option("--seed", type=Number(SEED), default=0, show_default=True),
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
        click.option("--draft-len", type=Number(NON_NEGATIVE_INT), default=0, show_default=True,
                     help="Chain length (0: chosen each round from measured costs and acceptance)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _generation_params(max_tokens, greedy, temperature, top_p, repetition_penalty, stop, seed, **extra):
    from blockffn.runtime.sampling import GenerationParams

    return GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, greedy=greedy, seed=seed,
                            repetition_penalty=repetition_penalty, stop=tuple(stop), **extra)


def _artifact(path, device: str) -> Path:
    """The given artifact, or the bundled model compiled for the device (once; kept in the user cache)."""
    if path is not None:
        return Path(path)
    from blockffn import default_artifact_path

    out = default_artifact_path(device)
    manifest = out / "blockffn-manifest.json"
    if not manifest.exists() or "library_sha256" not in manifest.read_text():  # absent, or cached before the digest
        from blockffn.compiler.compile import CompileOptions, compile_model

        click.echo(f"compiling the bundled model for {device} (once; cached in {out})", err=True)
        with quiet_logs():
            compile_model(CompileOptions(model_dir=default_model_path(), target=device, output=out, overwrite=True))
    return out


@cli.command("generate")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder run with PyTorch (default: the bundled model).")
@click.option("--artifact", "artifact_dir", type=click.Path(path_type=Path), default=None,
              help="Compiled artifact folder run with the TVM runtime (instead of --model).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Runtime device for --artifact.")
@click.option("--model-lib", type=click.Path(path_type=Path), default=None,
              help="--artifact: run this model library (built alone by `blockffn-compile -o NAME.so`) over the "
                   "folder's weights (from `blockffn convert-weight`) instead of the library its manifest names.")
@click.option("--prompt", required=True, callback=utf8_text)
@_sampling_options
@click.option("--sparse", is_flag=True, help="Union-sparse FFN in the PyTorch model.")
@click.option("--ffn", type=click.Choice(["auto", "sparse", "dense"]), default="auto", show_default=True,
              help="--artifact: as compiled (auto: prefill runs chunked-union or dense, whichever measured "
                   "faster here), always the sparse lowering, or the dense twins (same weights).")
@_speculation_options(None)
@click.option("--json", "as_json", is_flag=True, help='Print {"tokens": [...], "text": "...", "tok_per_s": ...}.')
def generate_cmd(model_dir, artifact_dir, device, model_lib, prompt, sparse, ffn, draft_dir, speculative, draft_len,
                 as_json, **sampling) -> None:
    """Generate text from a prompt, with PyTorch (--model) or a compiled artifact (--artifact); speculative decoding
    with a draft is lossless (same tokens when greedy, same distribution when sampling)."""
    params = _generation_params(**sampling)
    if speculative is None:  # plain decoding (seed-reproducible) unless a draft is named
        speculative = "auto" if draft_dir else "off"
    if model_dir and artifact_dir:
        raise BlockFFNError("give either --model or --artifact, not both")
    if artifact_dir:
        from blockffn.runtime.session import open_generator

        gen = open_generator(artifact_dir, device, draft_dir, speculative, draft_len, ffn, model_lib=model_lib)
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
        click.echo(to_json(out))
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
    if draft_len >= model.config.max_position_embeddings:  # the same bound the artifact path checks
        raise OptionError(f"--draft-len {draft_len} is beyond the context window of {model_dir} "
                          f"({model.config.max_position_embeddings} tokens)")
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
@click.option("--model-lib", type=click.Path(path_type=Path), default=None,
              help="Run this model library (built alone by `blockffn-compile -o NAME.so`) over the artifact's weights.")
@_sampling_options
@_speculation_options("auto")
def chat_cmd(artifact_dir, device, model_lib, draft_dir, speculative, draft_len, **sampling) -> None:
    """Interactive chat: /reset clears the conversation, /stats shows speeds, /exit leaves; Ctrl-C stops a reply."""
    from blockffn.runtime.chat import ChatSession

    params = _generation_params(**sampling)
    from blockffn.runtime.session import open_generator

    gen = open_generator(_artifact(artifact_dir, device), device, draft_dir, speculative, draft_len,
                         model_lib=model_lib)
    ChatSession(gen, params).repl()


def _read_utf8(path: Path) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise BlockFFNError(f"{path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise BlockFFNError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start})"
                            ) from None


@cli.command("bench")
@click.option("--artifact", "artifact_dir", type=click.Path(path_type=Path), default=None,
              help="Compiled artifact (default: the bundled model compiled for --device, cached).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--draft", "draft_dir", type=click.Path(path_type=Path), default=None,
              help="Draft (default: ARTIFACT/draft when present).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="One prompt per line (default: openings of bundled held-out documents).")
@click.option("--max-tokens", type=Number(POSITIVE_INT), default=64, show_default=True,
              help="Generated tokens per prompt.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, callback=writable_file,
              help="Write the numbers here.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, callback=writable_file,
              help="Bar chart PNG (matplotlib).")
@click.option("--model-lib", type=click.Path(path_type=Path), default=None,
              help="Run this model library (built alone by `blockffn-compile -o NAME.so`) over the artifact's weights.")
def bench_cmd(artifact_dir, device, draft_dir, prompts_file, max_tokens, json_out, plot_out, model_lib) -> None:
    """Decode/prefill tok/s for dense-AR, sparse-AR, dense-spec, sparse-spec (same weights), accepted length, and
    achieved bandwidth vs a bandwidth figure measured on the same device."""
    from blockffn.runtime.bench import plot, run_bench

    if plot_out and importlib.util.find_spec("matplotlib") is None:  # now, not after the benchmark
        raise BlockFFNError("--plot needs matplotlib (pip install matplotlib)")
    prompts = None
    if prompts_file:
        prompts = [line.strip() for line in _read_utf8(prompts_file).splitlines() if line.strip()]
        if not prompts:
            raise BlockFFNError(f"{prompts_file}: no prompts")
    art = _artifact(artifact_dir, device)
    click.echo(f"bench {art} on {device}")
    r = run_bench(art, device, draft_dir, prompts, max_tokens, log=click.echo, model_lib=model_lib)
    click.echo(f"  bandwidth {r['bandwidth_gbs']:.1f} GB/s measured; dense-AR streams {r['achieved_gbs']:.2f} GB/s of "
               f"weights = {r['roofline_fraction']:.2f} of it")
    for name, x in r["speedup_vs_dense_ar"].items():
        click.echo(f"  {name:<12} {x:5.2f}x dense-AR")
    if json_out:
        Path(json_out).write_text(to_json(r, indent=2) + "\n")
    if plot_out:
        plot(r, plot_out)
