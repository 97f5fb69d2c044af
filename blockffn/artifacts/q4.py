"""The q4 artifact format, q4f16_1 / q4f32_1 (MLC-LLM's GroupQuantize): the scheme, packing, numpy reference and
weight layout.  numpy only: the compiler writes it, the schedules' kernels decode it, the runtime reads it.

Scheme (research/mlc.md §1.2): groups of 32 consecutive weights along the reduction (input) axis share one scale
``max|w| / 7`` stored in the scale dtype; each weight becomes ``q = clip(rint(w / scale + 7), 0, 14)``, eight
4-bit values packed into a uint32 with element ``j`` at bits ``4·(j % 8)``; dequantization is ``(q − 7)·scale``.

Which tensors (MLC's naming: ``<name>.q_weight`` uint32, ``<name>.q_scale``):

* every linear layer (``X.weight [out, in]`` → ``X.q_weight [out, in/8]``, ``X.q_scale [out, in/32]``), the token
  embedding and the LM head;
* both expert projections, expert-major as MLC's MoE experts ``[E, out, in/8]`` so a gathered expert is one
  contiguous slab: ``mlp.up_proj`` (HF ``[E·De, d]``) → ``q_weight [E, De, d/8]``; ``mlp.down_proj``
  (HF ``[d, E·De]``) → ``q_weight [E, d, De/8]`` (groups along De never cross an expert);
* router weights, every norm and the router RMSNorm weight stay in full precision (the model dtype): the router
  decides which experts run, so its sign pattern must not move.

Every quantized tensor groups along the last axis of its HF tensor, so fake-quantizing the PyTorch model
(`blockffn.compiler.quantization.fake_quantize_model`) reproduces the artifact's weights exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockffn.errors import BlockFFNError

GROUP_SIZE = 32
BITS = 4
PER_WORD = 32 // BITS  # int4 values per uint32
MAX_INT = 7  # q ∈ [0, 14], zero point 7


@dataclass(frozen=True)
class GroupQuant:
    """One q4 group-quantization scheme; ``dtype`` is the model (compute) dtype and the scale dtype."""

    name: str
    dtype: str
    group_size: int = GROUP_SIZE
    bits: int = BITS

    def manifest(self) -> dict:
        return {"name": self.name, "kind": "group", "group_size": self.group_size, "bits": self.bits,
                "storage": "uint32", "elements_per_word": PER_WORD, "zero_point": MAX_INT,
                "scale_dtype": self.dtype, "dequantize": "(q - 7) * scale", "axis": "input (reduction)",
                "full_precision": ["mlp.router_proj.weight", "mlp.router_norm.weight", "*layernorm*", "*norm*"]}


# Manifest text of the q4 weight layout (the q0 artifacts record DOWN_PROJ_TRANSPOSED instead).
Q4_EXPERT_LAYOUT = ("linear X.weight [out, in] -> X.q_weight [out, in/8], X.q_scale [out, in/32]; "
                    "model.layers.*.mlp.up_proj HF [E*De, d] -> q_weight [E, De, d/8], q_scale [E, De, d/32]; "
                    "model.layers.*.mlp.down_proj HF [d, E*De] -> q_weight [E, d, De/8], q_scale [E, d, De/32]")

SCHEMES = {"q4f16_1": GroupQuant("q4f16_1", "float16"), "q4f32_1": GroupQuant("q4f32_1", "float32")}


def scheme_for(quantization: str) -> GroupQuant | None:
    """The group scheme of a ``--dtype`` name, or None for the unquantized q0* ones."""
    return SCHEMES.get(quantization)


def check_divisible(name: str, n: int, what: str = "input size") -> None:
    if n % GROUP_SIZE:
        raise BlockFFNError(f"{name}: {what} {n} is not a multiple of the quantization group size {GROUP_SIZE}; "
                            f"compile this model with --dtype q0f16 or q0f32")


def quantize(w: np.ndarray, scheme: GroupQuant) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w [..., K]`` along its last axis: (q_weight uint32 [..., K/8], q_scale [..., K/32])."""
    w = np.asarray(w, dtype=np.float32)
    K = w.shape[-1]
    check_divisible("tensor", K)
    groups = w.reshape(*w.shape[:-1], K // GROUP_SIZE, GROUP_SIZE)
    with np.errstate(over="ignore"):
        scale = (np.abs(groups).max(-1) / np.float32(MAX_INT)).astype(scheme.dtype)
    if not np.isfinite(scale).all():
        raise BlockFFNError(f"weights too large for {scheme.name} scales ({scheme.dtype}); use q4f32_1")
    s32 = scale.astype(np.float32)[..., None]
    safe = np.where(s32 == 0, np.float32(1), s32)
    q = np.clip(np.rint(groups / safe + MAX_INT), 0, 2 * MAX_INT).astype(np.uint32)
    q = q.reshape(*w.shape[:-1], K // PER_WORD, PER_WORD)
    shifts = (np.arange(PER_WORD, dtype=np.uint32) * BITS)
    packed = np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)
    return packed, scale


def unpack(q_weight: np.ndarray) -> np.ndarray:
    """uint32 [..., K/8] -> the 4-bit codes as uint32 [..., K]."""
    shifts = np.arange(PER_WORD, dtype=np.uint32) * BITS
    codes = (q_weight[..., None] >> shifts) & np.uint32(0xF)
    return codes.reshape(*q_weight.shape[:-1], -1)


def dequantize(q_weight: np.ndarray, q_scale: np.ndarray) -> np.ndarray:
    """``(q − 7)·scale`` in the scale dtype (as the compiled kernels compute it), shape [..., K]."""
    dt = q_scale.dtype
    codes = unpack(q_weight).astype(dt) - dt.type(MAX_INT)
    scale = np.repeat(q_scale, GROUP_SIZE, axis=-1)
    return codes * scale


# ------------------------------------------------------------------------------------------- model weights
def is_quantized(name: str) -> bool:
    """True for the tensors the scheme quantizes (HF names): 2-D weights except the router."""
    if name.endswith("mlp.up_proj") or name.endswith("mlp.down_proj"):
        return True
    if "norm" in name.rsplit(".", 2)[-2] or name.endswith("router_proj.weight"):
        return False
    return name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight") or name in (
        "model.embed_tokens.weight", "lm_head.weight")


def expert_major(name: str, w: np.ndarray, E: int) -> np.ndarray:
    """HF expert tensor -> [E, out, in] (groups along the last axis stay inside one expert)."""
    if name.endswith("mlp.up_proj"):  # [E·De, d] -> [E, De, d]
        return w.reshape(E, -1, w.shape[-1])
    d, EDe = w.shape  # down: [d, E·De] -> [E, d, De]
    return w.reshape(d, E, EDe // E).transpose(1, 0, 2)


def quantized_name(name: str, part: str) -> str:
    """``X.weight`` -> ``X.q_weight`` / ``X.q_scale``; expert tensors (no suffix) get ``.q_weight`` appended."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    return f"{base}.{part}"
