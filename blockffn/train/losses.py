"""The chunk-level-sparsity objectives of BlockFFN (research/blockffn.md §4.2–4.3).

Both losses take the per-layer *pre-ReLU* router logits A0 ``[B, T, E]`` and are averaged over layers.
Documents are packed, so the batch carries ``doc_pos`` (position of each token inside its document): a
token with ``doc_pos == 0`` starts a new document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AL_STEEPNESS = 100.0  # α of the activation-locality loss (--sigmoid_steep 100.0)


def locality_pairs(doc_pos: torch.Tensor) -> torch.Tensor:
    """Bool [B, T-1]: pair (t-1, t) is document-internal (t is not the first token of a document)."""
    return doc_pos[:, 1:] > 0


def activation_locality_loss(router_logits: list[torch.Tensor], doc_pos: torch.Tensor,
                             alpha: float = AL_STEEPNESS) -> torch.Tensor:
    """mean_layers mean_{valid t, e} BCEWithLogits(input = α·A0[t-1], target = σ(α·A0[t])).

    Written as ``softplus(x) - x·y`` so the gradient flows through both input and target, as in the official
    code (its target is not detached).  Returns the unweighted loss (multiply by λ_al)."""
    valid = locality_pairs(doc_pos).unsqueeze(-1)  # [B, T-1, 1]
    n_pairs = valid.sum()
    losses = []
    for a0 in router_logits:
        a0 = a0.float()
        x = alpha * a0[:, :-1]
        y = torch.sigmoid(alpha * a0[:, 1:])
        bce = F.softplus(x) - x * y
        denom = (n_pairs * a0.shape[-1]).clamp(min=1)
        losses.append((bce * valid).sum() / denom)
    return torch.stack(losses).mean()


def chunk_ids(doc_pos: torch.Tensor, chunk_len: int) -> tuple[torch.Tensor, int]:
    """Id of the chunk of every token [B, T] and the number of chunks.

    Chunks are ``chunk_len`` consecutive tokens aligned to the start of each document, which is exactly what the
    official code gets by right-padding every document to a multiple of the chunk length; a chunk never straddles
    two documents or two batch rows."""
    new = (doc_pos % chunk_len) == 0
    new[:, 0] = True
    ids = new.reshape(-1).long().cumsum(0) - 1
    return ids.view_as(doc_pos), int(ids[-1].item()) + 1


def chunk_sparsity_loss(router_logits: list[torch.Tensor], doc_pos: torch.Tensor, chunk_len: int = 64,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean_layers mean_{chunk, e} [1 − exp(Σ_{t∈chunk} ln(1 − p_{t,e} + 1e-5))], p = sum-normalised ReLU(A0).

    ``token_mask`` [B, T] (True = real token) zeroes p for padding, as the official ``seq_mask`` does.
    Computed in fp32.  Returns the unweighted loss (multiply by λ_cs)."""
    ids, n_chunks = chunk_ids(doc_pos, chunk_len)
    flat_ids = ids.reshape(-1)
    losses = []
    for a0 in router_logits:
        a1 = F.relu(a0.float())
        p = a1 / (a1.sum(-1, keepdim=True) + 1e-5)
        if token_mask is not None:
            p = p * token_mask.unsqueeze(-1).to(p.dtype)
        log_keep = torch.log(1 - p + 1e-5).reshape(-1, p.shape[-1])
        per_chunk = torch.zeros(n_chunks, p.shape[-1], dtype=p.dtype, device=p.device)
        per_chunk = per_chunk.index_add(0, flat_ids, log_keep)
        losses.append((1 - torch.exp(per_chunk)).mean())
    return torch.stack(losses).mean()
