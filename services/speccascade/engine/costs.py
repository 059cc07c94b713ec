"""What a replica measures of itself for the speculation controller: forward costs and load.

Each worker (engine.workers) times its own forwards and keeps

    t(x) = c · x,   x = (1, rows, tokens)   the verifier: a forward of `rows` sequences that
                                             computes `tokens` positions in all (padding included)
    t(x) = c · x,   x = (1, steps, tokens)  the drafter: a call of `steps` steps that compute
                                             `tokens` positions in all

fitted by exponentially weighted least squares over its recent forwards (forgetting factor λ per
forward, so about 1 / (1 − λ) forwards count) plus a few calibration forwards of varied shapes that
the worker times at start (`add_prior`, never forgotten): a request's forwards often all look
alike, and one shape alone cannot tell a fixed cost from a per-token one. Load is two measured
numbers: the busy fraction of the forward thread (busy time / wall time, both decayed with time
constant τ) and the sequences that called in the last `active_window_s` and were not released
since. Every result carries a `CostReport` snapshot, so the router learns the costs and load of
exactly the replicas its request is pinned to, without extra calls.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable


@dataclass(frozen=True)
class CostReport:
    """A replica's cost fit and load, as of the forward that served the call."""
    coef: tuple[float, float, float]   # c of t(x) = c · x, milliseconds
    rows: float                        # mean rows per forward (recent)
    busy: float                        # busy fraction of the forward thread, [0, 1]
    active: int                        # sequences that called within the active window

    def predict(self, a: float, b: float) -> float:
        """t(1, a, b) in ms, never below a tenth of the intercept (a fit is only a fit)."""
        c0, c1, c2 = self.coef
        return max(c0 + c1 * a + c2 * b, 0.1 * abs(c0), 1e-3)


def _solve3(m: list[list[float]], v: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the 3×3 normal equations."""
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        if abs(a[col][col]) < 1e-12:
            return [0.0, 0.0, 0.0]
        for r in range(col + 1, 3):
            f = a[r][col] / a[col][col]
            for k in range(col, 4):
                a[r][k] -= f * a[col][k]
    out = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        out[r] = (a[r][3] - sum(a[r][k] * out[k] for k in range(r + 1, 3))) / a[r][r]
    return out


class CostMeter:
    """Online least-squares fit of forward time, busy fraction and active sequences."""

    def __init__(self, forget: float = 0.97, ridge: float = 1e-3, tau_s: float = 2.0,
                 active_window_s: float = 1.0):
        self.forget, self.ridge, self.tau_s = forget, ridge, tau_s
        self.active_window_s = active_window_s
        self._xx = [[0.0] * 3 for _ in range(3)]
        self._xt = [0.0] * 3
        self._prior_xx = [[0.0] * 3 for _ in range(3)]
        self._prior_xt = [0.0] * 3
        self._coef = (0.0, 0.0, 0.0)
        self._rows = 1.0
        self._busy_ms = self._wall_ms = 0.0
        self._last_end: float | None = None
        self._seen: OrderedDict[str, float] = OrderedDict()   # seq_id -> last call time

    def add_prior(self, x: tuple[float, float, float], ms: float, weight: float = 3.0) -> None:
        """A calibration forward, counted as `weight` forwards and never forgotten."""
        for i in range(3):
            self._prior_xt[i] += weight * x[i] * ms
            for j in range(3):
                self._prior_xx[i][j] += weight * x[i] * x[j]
        self._fit()

    def _fit(self) -> None:
        m = [[self._xx[i][j] + self._prior_xx[i][j] for j in range(3)] for i in range(3)]
        v = [self._xt[i] + self._prior_xt[i] for i in range(3)]
        # A weak ridge on the slopes keeps the fit defined when the forwards never varied.
        scale = max(m[0][0], 1e-9)
        for i in (1, 2):
            m[i][i] += self.ridge * scale
        coef = _solve3(m, v)
        # Costs do not fall with rows or tokens: a negative slope is noise; fit without it.
        for i in (1, 2):
            if coef[i] < 0:
                m = [[(1.0 if r == c else 0.0) if i in (r, c) else m[r][c] for c in range(3)]
                     for r in range(3)]
                v = [0.0 if r == i else v[r] for r in range(3)]
                coef = _solve3(m, v)
        self._coef = tuple(coef)

    def observe(self, x: tuple[float, float, float], ms: float, rows: int,
                seq_ids: list[str], started: float, ended: float) -> None:
        """One forward: its features x, duration, rows and sequences, start and end times."""
        lam = self.forget
        for i in range(3):
            self._xt[i] = lam * self._xt[i] + x[i] * ms
            for j in range(3):
                self._xx[i][j] = lam * self._xx[i][j] + x[i] * x[j]
        self._fit()
        self._rows += 0.1 * (rows - self._rows)
        # Busy fraction: forward time over wall time since the last forward ended, decayed.
        wall = (ended - self._last_end) * 1000 if self._last_end is not None else ms
        decay = math.exp(-wall / 1000 / self.tau_s)
        self._busy_ms = decay * self._busy_ms + ms
        self._wall_ms = decay * self._wall_ms + max(wall, ms)
        self._last_end = ended
        for seq_id in seq_ids:
            self._seen[seq_id] = ended
            self._seen.move_to_end(seq_id)
        cutoff = ended - self.active_window_s
        while self._seen and next(iter(self._seen.values())) < cutoff:
            self._seen.popitem(last=False)

    def released(self, seq_id: str) -> None:
        """A released sequence no longer loads the replica (a finished request must not count
        as a concurrent one for the rest of the window)."""
        self._seen.pop(seq_id, None)

    def report(self) -> CostReport:
        busy = self._busy_ms / self._wall_ms if self._wall_ms else 0.0
        return CostReport(self._coef, self._rows, min(1.0, busy), len(self._seen))


async def served(call: Awaitable, unwrap: Callable = lambda r: r):
    """Await a replica-side call and set the result's served_ms: the time the replica held it
    (queue and forward), which the caller subtracts from its wall time to get the transport's."""
    started = time.perf_counter()
    result = unwrap(await call)
    result.served_ms = (time.perf_counter() - started) * 1000
    return result
