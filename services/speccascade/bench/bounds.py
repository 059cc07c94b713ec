"""The analytic speedup bounds of REFERENCE.md §2, from measured α and step costs."""
from __future__ import annotations


def expected_tokens(alpha: float, gamma: int) -> float:
    """E = (1 − α^(γ+1)) / (1 − α): tokens per round with i.i.d. acceptance α."""
    if alpha >= 1:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def alpha_from_mean_accepted_length(mean_length: float, gamma: int) -> float:
    """Invert E(α) by bisection: the α that explains a measured mean accepted length."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, gamma) < mean_length else (lo, mid)
    return (lo + hi) / 2


def sequential_bound(alpha: float, gamma: int, t_target: float, t_draft: float,
                     t_verify: float) -> float:
    """S = E · t_target(1) / (γ·t_draft + t_verify(γ+1))."""
    return expected_tokens(alpha, gamma) * t_target / (gamma * t_draft + t_verify)


def pipelined_bound(alpha: float, gamma: int, t_target: float, t_draft: float,
                    t_verify: float) -> float:
    """E · t_target(1) / max(γ·t_draft, t_verify): drafting fully hidden behind verification.

    An upper bound: it ignores the speculated blocks thrown away after a rejection."""
    return expected_tokens(alpha, gamma) * t_target / max(gamma * t_draft, t_verify)
