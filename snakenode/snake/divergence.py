"""Jensen-Shannon divergence between label histograms: one definition for routing and for `kd.mode = auto`.

Natural logarithm, so the value lies in [0, ln 2] (~0.693) and `kd.auto_threshold` (default 0.1) is in
nats. The same definition as `snakenode.train.data.js_divergence`; this copy is pure Python so the daemon's
routing needs neither numpy arrays nor the data module, and it never raises on odd input from the network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LN2 = math.log(2.0)


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """JS(p, q) in nats. Inputs are non-negative counts (normalised here); the shorter one is padded with
    zeros. Two empty histograms are identical (0.0); an empty one against a non-empty one is as far apart
    as histograms get (ln 2). Raises ValueError on a negative or non-finite count."""
    n = max(len(p), len(q))
    a = [float(x) for x in p] + [0.0] * (n - len(p))
    b = [float(x) for x in q] + [0.0] * (n - len(q))
    for x in (*a, *b):
        if not math.isfinite(x) or x < 0:
            raise ValueError(f"histogram counts must be finite and >= 0, got {x!r}")
    sa, sb = sum(a), sum(b)
    if sa <= 0 or sb <= 0:
        return 0.0 if sa <= 0 and sb <= 0 else LN2
    a = [x / sa for x in a]
    b = [x / sb for x in b]
    m = [0.5 * (x + y) for x, y in zip(a, b, strict=True)]
    # Each KL term summed on its own, so js(p, q) == js(q, p) exactly (float addition commutes).
    kl_a = sum(x * math.log(x / mi) for x, mi in zip(a, m, strict=True) if x > 0)
    kl_b = sum(y * math.log(y / mi) for y, mi in zip(b, m, strict=True) if y > 0)
    return min(max(0.5 * (kl_a + kl_b), 0.0), LN2)
