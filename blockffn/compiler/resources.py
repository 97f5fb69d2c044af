"""Wall time and peak memory per phase of a command (what `blockffn-compile`, `convert-weight` and `gen-config`
report), so users can size the machine that compiles official-size models."""

from __future__ import annotations

import logging
import resource
import sys
import time


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


logger = logging.getLogger(__name__)


class PhaseTimer:
    """Logs each phase with its wall time and the process's peak RSS when it ended."""

    def __init__(self):
        self.times, self.peak_rss_mb = {}, {}
        self.pipeline_phases: dict[str, float] = {}  # seconds of each pipeline phase (inside the "passes" time)

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, exc_type, *_):
                if exc_type is None:
                    timer.times[name] = round(time.perf_counter() - self.t0, 3)
                    timer.peak_rss_mb[name] = peak_rss_mb()
                    logger.info(f"  {name:<15} {timer.times[name]:7.2f} s   peak RSS {timer.peak_rss_mb[name]:8.1f} MiB")
                return False

        return _Phase()
