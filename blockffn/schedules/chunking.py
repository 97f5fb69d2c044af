"""Token chunks of a sparse FFN call, shared by the CPU, GPU and q4 sparse kernels.

Decode and speculative verification take the union of active experts over the whole call (one chunk).  A long
prefill would union nearly every expert, so its kernels split the call into chunks of ``C`` consecutive tokens,
each with its own union: BlockFFN's chunk-level sparsity (CLS) is exactly what keeps those unions small.
"""

from __future__ import annotations

from tvm.script import tirx as T


class Chunking:
    """Token chunks of a call, as TIR expressions: ``chunk=None`` is one chunk (the call-wide union)."""

    def __init__(self, chunk: int | None):
        self.size = chunk

    def count(self, n_tok):
        """Number of chunks of ``n_tok`` tokens (the first dimension of ``idx`` / ``count``)."""
        return 1 if self.size is None else (n_tok + self.size - 1) // self.size

    def of(self, t):
        """Chunk of token ``t``."""
        return 0 if self.size is None else t // self.size

    def start(self, c):
        return 0 if self.size is None else c * self.size

    def tokens(self, c, n_tok):
        """Number of tokens in chunk ``c``."""
        return n_tok if self.size is None else T.min(self.size, n_tok - c * self.size)
