"""Benchmark weights whose router activates exactly a fraction F of the experts for every token in every layer.

Speed figures of sparse decoding depend on how many experts a step touches; a random checkpoint activates about
half of them and a trained one a model-specific share.  To compare engines at a known activation (the official
engine's anchor on the H200 uses F = 1/4), hidden coordinate ``J`` becomes a constant positive channel and every
router reads only that channel:

* ``embed_tokens[:, J] = 1``; row ``J`` of every ``o_proj`` and ``down_proj`` is zeroed, so no layer writes
  coordinate J and it stays ``scale_emb`` > 0 through the network (the residual stream only adds layer outputs);
* the router rows of the chosen experts are ``one_hot(J)``, all other rows 0: after the RMSNorm before the FFN the
  chosen experts see a positive pre-activation (active), the others exactly 0 (inactive: active iff > 0).

Everything else keeps its values, so attention and the experts still do real work.  Never the default: a model
made this way routes by construction, not by content.
"""

from __future__ import annotations

import torch

from blockffn.errors import ConfigError

BIAS_CHANNEL = 7


def active_experts(num_experts: int, fraction: float) -> list[int]:
    """The experts kept active: ``round(F·E)`` of them, evenly spread (every 4th for F = 1/4, as in the anchor)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--force-active must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * num_experts))
    return sorted({(i * num_experts) // k for i in range(k)})


def force_active(model, fraction: float) -> list[int]:
    """Rewrite ``model`` (in place) so that exactly the experts of `active_experts` fire; returns them."""
    cfg = model.config
    if cfg.hidden_size <= BIAS_CHANNEL:
        raise ConfigError(f"--force-active needs hidden_size > {BIAS_CHANNEL}")
    chosen = active_experts(cfg.num_experts, fraction)
    J = BIAS_CHANNEL
    with torch.no_grad():
        model.model.embed_tokens.weight[:, J] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[J, :] = 0
            layer.mlp.down_proj[J, :] = 0
            router = layer.mlp.router_proj.weight
            router.zero_()
            router[chosen, J] = 1.0
    return chosen
