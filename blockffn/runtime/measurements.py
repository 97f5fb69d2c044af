"""Device measurements the runtime makes once and keeps: cached on disk per library file, device and mode.

Timing library calls takes a second or two; repeating it at every start-up would cost more than it saves on a
short generation, so results live in ``blockffn.cache_dir()`` keyed by the library's path and mtime (a rebuilt
library is measured again).  A read-only or corrupt cache only costs a re-measurement.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np


def best_time(fn, repeat: int = 7) -> float:
    """Fastest of ``repeat`` runs after a warm-up: the cost without interference from other processes."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.min(times))


def interpolate_cost(costs: dict, n: float) -> float:
    """Seconds for size ``n`` from measured {size: seconds}: linear between the measured sizes, extended past the
    largest along the last segment (proportional to size with a single measurement)."""
    xs = np.array(sorted(costs), dtype=float)
    ys = np.array([costs[k] for k in sorted(costs)], dtype=float)
    if len(xs) == 1:
        return float(ys[0] * n / xs[0])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(np.interp(n, xs, ys, right=ys[-1] + (n - xs[-1]) * slope))


def cached_measurement(kind: str, library: Path, parts: list[str], measure: Callable[[], dict],
                       parse: Callable[[dict], object] = lambda d: d):
    """``parse(measure())`` (``measure`` returns a JSON-able dict), cached under ``kind`` for this library file and
    the key ``parts``.  An entry that ``parse`` rejects (KeyError/TypeError/ValueError) is measured again and
    replaced."""
    library = Path(library)
    key_src = [str(library.resolve()), str(library.stat().st_mtime), *parts]
    key = hashlib.sha256("|".join(key_src).encode()).hexdigest()[:16]
    from blockffn import cache_dir

    path = cache_dir() / f"{kind}-{key}.json"
    if path.exists():
        try:
            return parse(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # corrupt or of another format: measure again and replace it
    result = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs a re-measurement
    return parse(result)
