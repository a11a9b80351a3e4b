"""The chi-square distribution's upper tail, for the statistical tests (no scipy needed)."""

from __future__ import annotations

import math


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with ``df`` degrees of freedom > x): the regularised upper incomplete
    gamma function Q(df / 2, x / 2), by its series below a + 1 and Lentz's continued
    fraction above."""
    a, z = df / 2, x / 2
    if z <= 0:
        return 1.0
    if z < a + 1:
        term = total = 1 / a
        for n in range(1, 2000):
            term *= z / (a + n)
            total += term
        return max(0.0, 1 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    b, c, d = z + 1 - a, 1e300, 1 / (z + 1 - a)
    h = d
    for i in range(1, 2000):
        an = -i * (i - a)
        b += 2
        d = 1 / (an * d + b)
        c = b + an / c
        h *= d * c
    return h * math.exp(-z + a * math.log(z) - math.lgamma(a))
