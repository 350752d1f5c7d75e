"""Paired differences over seeds: the mean and its 95 % interval (Student t), as the ablation reports them."""

from __future__ import annotations

import math
from dataclasses import dataclass

# 0.975 quantiles of Student's t for 1..30 degrees of freedom (two-sided 95 %); beyond 30 the normal 1.96 is close.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom (2 samples), got {dof}")
    return T_975[dof - 1] if dof <= len(T_975) else 1.96


@dataclass(frozen=True)
class Interval:
    """mean ± half_width over n paired samples; half_width is None for a single sample (no interval)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def excludes_zero(self) -> bool:
        return self.half_width is not None and (self.high < 0 or self.low > 0)

    def __str__(self) -> str:
        if self.half_width is None:
            return f"{self.mean:+.3f} (n=1)"
        return f"{self.mean:+.3f} ± {self.half_width:.3f}"


def mean_interval(values: list[float]) -> Interval:
    """The mean of the values and the half-width of its 95 % t interval."""
    if not values:
        raise ValueError("no values to average")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, None, 1)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Interval(mean, t_quantile_975(n - 1) * math.sqrt(variance / n), n)


def paired_interval(values: dict[int, float], baseline: dict[int, float]) -> Interval | None:
    """The mean difference value - baseline over the seeds both have, with its 95 % interval; None if none shared."""
    shared = sorted(set(values) & set(baseline))
    if not shared:
        return None
    return mean_interval([values[s] - baseline[s] for s in shared])


def seeds_to_resolve(interval: Interval, most: int = 30) -> int | None:
    """The fewest seeds whose 95 % interval would exclude zero if the mean and spread stayed as measured (the
    t quantile shrinks with them: with 3 seeds it is 4.30, with 10 it is 2.26); None beyond `most`."""
    if interval.half_width is None or interval.mean == 0:
        return None
    spread = interval.half_width * math.sqrt(interval.n) / t_quantile_975(interval.n - 1)  # the sample's sd
    for n in range(2, most + 1):
        if t_quantile_975(n - 1) * spread / math.sqrt(n) < abs(interval.mean):
            return n
    return None
