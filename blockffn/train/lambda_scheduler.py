"""Adaptive λ_cs scheduler of the chunk-sparsification loss (research/blockffn.md §4.4, paper App. B Eq. 7).

λ stays at λ0 for ``stable_steps``.  Then, every ``adjust_every`` steps, γ = mean(L_cs over the last window) /
mean(L_cs over the window before); the target is γ·λ if γ ≤ 1, else max(min_factor, γ)·λ, capped at
``max_factor``·λ0.  As in the official code (not the paper), λ moves to the target as a linear ramp over the
next window rather than jumping.
"""

from __future__ import annotations

from collections import deque


class AdaptiveLambda:
    def __init__(self, lambda0: float, stable_steps: int = 1000, adjust_every: int = 100,
                 min_factor: float = 1.025, max_factor: float = 4.0):
        if adjust_every <= 0 or stable_steps < 0:
            raise ValueError("adjust_every must be > 0 and stable_steps >= 0")
        self.lambda0 = lambda0
        self.stable_steps, self.adjust_every = stable_steps, adjust_every
        self.min_factor, self.max_factor = min_factor, max_factor
        self.value = lambda0
        self.step_count = 0
        self.history: deque[float] = deque(maxlen=2 * adjust_every)
        self._ramp_from = self._ramp_to = lambda0
        self._ramp_start = 0

    def step(self, cs_loss: float) -> float:
        """Record this step's (all-reduced, layer-averaged) CS loss; return λ_cs for the next step."""
        self.history.append(float(cs_loss))
        self.step_count += 1
        n = self.step_count
        if self._ramp_to != self._ramp_from:  # advance the running ramp first, so it completes at the decision
            frac = min(1.0, (n - self._ramp_start) / self.adjust_every)
            self.value = self._ramp_from + (self._ramp_to - self._ramp_from) * frac
        if n >= self.stable_steps and (n - self.stable_steps) % self.adjust_every == 0 \
                and len(self.history) == 2 * self.adjust_every:
            recent = list(self.history)
            prev = sum(recent[: self.adjust_every]) / self.adjust_every
            last = sum(recent[self.adjust_every:]) / self.adjust_every
            gamma = last / prev if prev > 0 else 1.0
            factor = gamma if gamma <= 1 else max(self.min_factor, gamma)
            target = min(self.value * factor, self.max_factor * self.lambda0)
            self._ramp_from, self._ramp_to, self._ramp_start = self.value, target, n
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "step_count": self.step_count, "history": list(self.history),
                "ramp": [self._ramp_from, self._ramp_to, self._ramp_start]}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.step_count = int(state["step_count"])
        self.history = deque((float(x) for x in state["history"]), maxlen=2 * self.adjust_every)
        self._ramp_from, self._ramp_to, self._ramp_start = (float(state["ramp"][0]), float(state["ramp"][1]),
                                                            int(state["ramp"][2]))
