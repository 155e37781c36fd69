"""How long a failed attempt waits before the next one."""

from __future__ import annotations

import random
from collections.abc import Callable


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds before retrying after failed attempt number ``attempt`` (1-based).

    Exponential with jitter and a cap: uniform in ``[b/2, b]`` where
    ``b = min(cap, base * 2 ** (attempt - 1))``. The jitter spreads a burst of failures
    (a dependency that fell over) so they do not come back in lockstep, and keeping it in
    the upper half makes each gap at least as long as the one before, which is what an
    operator reading ``run_at`` expects. The exponent stops at 64: any sane cap is reached
    long before, and the float stays finite.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    exponent = min(attempt - 1, 64)
    bound = min(cap, base * 2.0**exponent)
    return bound / 2.0 + rand() * bound / 2.0
