"""Mean accepted length of EAGLE speculative decoding (PyTorch reference), greedy chain and tree.

    python benchmarks/spec_acceptance.py [--model DIR] [--draft DIR] [--prompts 20] [--prompt-tokens 48]
        [--max-tokens 64] [--chain-len 4] [--temperature 0 | T] [--json OUT.json]

Prompts are the first ``--prompt-tokens`` tokens of the first ``--prompts`` held-out documents
(``blockffn/bundled/heldout.txt.xz``, never trained on) that are long enough.  Greedy (default): every speculative
output is checked token for token against plain greedy decoding; ``--temperature T``: sampling with top-p 0.95,
prompt i seeded with i.  "Accepted length" is the number of tokens one verify call emits
(accepted draft tokens + the target's bonus token), averaged over all verify calls of all prompts, as in the
BlockFFN / EAGLE papers.  Wall-clock numbers of the eager PyTorch reference are not a speed claim and are not
reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from blockffn import default_model_path
from blockffn.data.prepare import load_tokenizer, read_documents
from blockffn.model import load_model
from blockffn.model.draft import bundled_draft_path, load_draft
from blockffn.model.generate import SamplingParams, generate
from blockffn.model.spec_generate import SpecParams, speculative_generate


def held_out_prompts(tok, n: int, prompt_tokens: int) -> list[list[int]]:
    docs = read_documents(default_model_path().parent / "heldout.txt.xz")
    out = []
    for d in docs:
        ids = tok.encode(d).ids
        if len(ids) >= 2 * prompt_tokens:
            out.append(ids[:prompt_tokens])
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_path())
    ap.add_argument("--draft", type=Path, default=None, help="default: MODEL/draft")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chain-len", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling (top-p 0.95)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    target = load_model(args.model)
    draft = load_draft(args.draft or bundled_draft_path(args.model), target)
    tok = load_tokenizer(args.model)
    prompts = held_out_prompts(tok, args.prompts, args.prompt_tokens)
    greedy = args.temperature <= 0
    params = SamplingParams(max_tokens=args.max_tokens, greedy=greedy, temperature=args.temperature, top_p=0.95,
                            stop_at_eos=False)
    modes = {f"chain k={args.chain_len}": SpecParams(mode="chain", chain_len=args.chain_len),
             "tree (depth 3, top-10, 32 nodes)": SpecParams(mode="tree")}
    result = {"prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
              "temperature": args.temperature, "modes": {}}
    refs = [generate(target, p, params)["tokens"] if greedy else None for p in prompts]
    for name, spec in modes.items():
        accepted, same = [], 0
        for seed, (p, ref) in enumerate(zip(prompts, refs)):
            params.seed = seed
            r = speculative_generate(target, draft, p, params, spec)
            accepted += r["accepted"]
            same += r["tokens"] == ref
        check = f"{same}/{len(prompts)}" if greedy else "n/a (sampling)"
        result["modes"][name] = {"mean_accepted": float(np.mean(accepted)), "verify_calls": len(accepted),
                                 "identical_to_greedy": check, "histogram": np.bincount(accepted).tolist()}
        print(f"{name:<34} mean accepted length {np.mean(accepted):.3f} over {len(accepted)} verify calls "
              f"(histogram {np.bincount(accepted).tolist()}); outputs identical to plain greedy: {check}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
