"""Reference text generation with the PyTorch model (KV cache, greedy / temperature / top-p sampling).

This is the eager baseline that compiled artifacts are compared against, token for token in greedy mode.
"""

from __future__ import annotations

import time

import torch

from blockffn.errors import BlockFFNError
from blockffn.model.modeling import BlockFFNForCausalLM, KVCache
from blockffn.model.speculative import sampling_probs
from blockffn.sampling_params import SamplingParams  # noqa: F401 - re-exported (the PyTorch path's options)


def sample_next(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token from a [V] logit vector: the distribution of `blockffn.model.speculative.sampling_probs` (one
    temperature softmax and one top-p, `blockffn.nucleus`, for every path), drawn with torch's generator."""
    if params.greedy or params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = sampling_probs(logits.detach().float().cpu().numpy(), params.temperature, params.top_p)
    return int(torch.multinomial(torch.from_numpy(probs), 1, generator=gen))


@torch.no_grad()
def generate(model: BlockFFNForCausalLM, prompt_ids: list[int], params: SamplingParams,
             sparse: bool = False) -> dict:
    """Prefill the prompt, then decode one token at a time.  Returns tokens and timings."""
    cfg = model.config
    if not prompt_ids:
        raise BlockFFNError("the prompt encodes to zero tokens")
    if len(prompt_ids) + params.max_tokens > cfg.max_position_embeddings:
        raise BlockFFNError(f"prompt ({len(prompt_ids)} tokens) + --max-tokens {params.max_tokens} exceeds the "
                            f"context window of {cfg.max_position_embeddings}")
    gen = torch.Generator().manual_seed(params.seed)
    cache = KVCache()
    t0 = time.perf_counter()
    out = model(torch.tensor([prompt_ids]), cache=cache, sparse=sparse)
    t_prefill = time.perf_counter() - t0
    tokens: list[int] = []
    t1 = time.perf_counter()
    logits = out.logits[0, -1]
    for _ in range(params.max_tokens):
        nxt = sample_next(logits, params, gen)
        tokens.append(nxt)
        if params.stop_at_eos and nxt == cfg.eos_token_id:
            break
        if len(tokens) == params.max_tokens:
            break
        logits = model(torch.tensor([[nxt]]), cache=cache, sparse=sparse).logits[0, -1]
    t_decode = time.perf_counter() - t1
    return {"tokens": tokens, "prefill_s": t_prefill, "decode_s": t_decode,
            "tok_per_s": len(tokens) / t_decode if t_decode > 0 else float("inf")}
