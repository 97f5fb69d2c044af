"""Quantizing a model for a q4 artifact: its tensors in the q4 format (`blockffn.artifacts.q4`, which holds the
scheme, packing and numpy reference), and the fake-quantized PyTorch model that computes with exactly those weights.
"""

from __future__ import annotations

import numpy as np

from blockffn.artifacts.q4 import (  # noqa: F401 - the format, re-exported for the compiler's callers
    BITS, GROUP_SIZE, MAX_INT, PER_WORD, Q4_EXPERT_LAYOUT, SCHEMES, GroupQuant, check_divisible, dequantize,
    expert_major, is_quantized, quantize, quantized_name, scheme_for, unpack)


def library_tensors(state_dict: dict, cfg, scheme: GroupQuant) -> dict[str, np.ndarray]:
    """The artifact's tensors for a quantized model: q_weight/q_scale pairs for the quantized weights, the rest
    in the scheme's dtype (HF names, HF layout)."""
    out = {}
    for name, t in state_dict.items():
        w = t.detach().float().cpu().numpy()
        if not is_quantized(name):
            out[name] = w.astype(scheme.dtype)
            continue
        check_divisible(name, cfg.expert_size if name.endswith("mlp.down_proj") else w.shape[-1],
                        "expert size" if name.endswith("mlp.down_proj") else "input size")
        if name.endswith(("mlp.up_proj", "mlp.down_proj")):
            w = np.ascontiguousarray(expert_major(name, w, cfg.num_experts))
        q, s = quantize(w, scheme)
        out[quantized_name(name, "q_weight")], out[quantized_name(name, "q_scale")] = q, s
    return out


def fake_quantize_model(model, scheme: GroupQuant):
    """Replace every quantized weight of a PyTorch model by its dequantized value (in place, float32), so the
    model computes with exactly the artifact's weights.  Returns the model."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_quantized(name):
                w = p.detach().float().cpu().numpy()
                check_divisible(name, w.shape[-1])
                if name.endswith("mlp.down_proj"):
                    check_divisible(name, model.config.expert_size, "expert size")
                q, s = quantize(w, scheme)  # groups along HF's last axis == the artifact's groups
                p.copy_(torch.from_numpy(dequantize(q, s).astype(np.float32)))
    return model
