"""Sampling options shared by the PyTorch reference (`blockffn.model.generate`) and the compiled runtime
(`blockffn.runtime`); a module of its own so that the runtime does not import PyTorch.  Both paths build these
objects, so both refuse the same values (``blockffn.validation``)."""

from __future__ import annotations

from dataclasses import dataclass

from blockffn.validation import check_sampling


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    greedy: bool = False
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self):
        check_sampling(self)
