"""Token selection over compiled libraries: repetition penalty through the library's ``apply_penalty_inplace``,
temperature softmax through its ``softmax_with_temperature``, nucleus (top-p) filtering, greedy argmax.

Rows are independent "sequences" for the library functions, so one call processes every row of a verify call, each
with its own history (the generated tokens plus the tree path above that row).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from blockffn.nucleus import top_p_filter  # noqa: F401 - the one top-p, re-exported for the runtime's callers
from blockffn.sampling_params import SamplingParams
from blockffn.validation import POSITIVE


@dataclass
class GenerationParams(SamplingParams):
    repetition_penalty: float = 1.0  # > 1 discourages tokens already generated (MLC / HF semantics)
    stop: tuple = ()  # stop strings: generation ends before the first occurrence
    stop_token_ids: tuple = ()  # extra stop tokens (EOS is one when stop_at_eos)

    def __post_init__(self):
        super().__post_init__()
        POSITIVE.check("repetition_penalty", self.repetition_penalty)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature <= 0


class LibrarySampler:
    def __init__(self, engine):
        self.engine = engine

    def penalised(self, logits: np.ndarray, histories, penalty: float) -> np.ndarray:
        """logits [n, V] with the repetition penalty of ``histories[i]`` applied to row i (library kernel)."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if penalty == 1.0 or not any(histories):
            return logits
        pos2seq, token_ids, counts = [], [], []
        for row, hist in enumerate(histories):
            for tok, cnt in sorted(Counter(hist).items()):
                pos2seq.append(row)
                token_ids.append(tok)
                counts.append(cnt)
        e = self.engine
        t = e._tensor(logits)
        i32 = lambda a: e._tensor(np.asarray(a, dtype=np.int32))  # noqa: E731
        penalties = np.tile(np.array([[0.0, 0.0, penalty]], dtype=np.float32), (len(histories), 1))
        e.library_function("apply_penalty_inplace")(t, i32(np.arange(len(histories))), i32(pos2seq), i32(token_ids),
                                                     i32(counts), e._tensor(penalties))
        return t.numpy()

    def probs(self, logits: np.ndarray, params: GenerationParams) -> np.ndarray:
        """Sampling distribution per row [n, V] (float64): library temperature softmax, then top-p."""
        e, n = self.engine, logits.shape[0]
        rows = []
        for i in range(0, n, e.max_batch):  # the library's memory plan holds max_batch_size rows
            part = np.ascontiguousarray(logits[i: i + e.max_batch], dtype=np.float32)
            temp = e._tensor(np.full((len(part),), params.temperature, dtype=np.float32))
            rows.append(e.vm["softmax_with_temperature"](e._tensor(part[:, None]), temp).numpy()[:, 0])
        return top_p_filter(np.concatenate(rows), params.top_p)

    def choose(self, logits: np.ndarray, history, params: GenerationParams, rng: np.random.Generator) -> int:
        """One token from a [V] logit vector given the generated history."""
        row = self.penalised(logits[None], [history], params.repetition_penalty)
        if params.is_greedy:
            return int(np.argmax(row[0]))
        from blockffn.model.speculative import sample_index

        return sample_index(self.probs(row, params)[0], rng)
