"""Service metrics (ray.serve.metrics: Serve adds deployment and replica tags to each).

Names follow REFERENCE.md §1: drafted/accepted tokens, acceptance rate, mean accepted length
(counting the bonus/recovered token), deferrals; latencies in milliseconds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ray.serve.metrics import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from speccascade.engine.seam import RequestStats

_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
_FRACTION = [0.1 * i for i in range(1, 11)]
_LENGTH = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 17]


class RouterMetrics:
    def __init__(self):
        tags = ("mode",)
        self.requests = Counter("speccascade_requests", "Finished requests by mode and status",
                                tag_keys=("mode", "status"))
        self.tokens = Counter("speccascade_generated_tokens", "Tokens generated", tag_keys=tags)
        self.drafted = Counter("speccascade_drafted_tokens", "Draft tokens proposed", tag_keys=tags)
        self.accepted = Counter("speccascade_accepted_tokens", "Draft tokens accepted",
                                tag_keys=tags)
        self.deferrals = Counter("speccascade_deferrals", "Cascade positions deferred to the target",
                                 tag_keys=tags)
        self.acceptance_rate = Histogram("speccascade_acceptance_rate",
                                         "Per request: accepted / drafted", _FRACTION, tags)
        self.mean_accepted_length = Histogram(
            "speccascade_mean_accepted_length",
            "Per request: tokens emitted per verification round", _LENGTH, tags)
        self.ttft_ms = Histogram("speccascade_ttft_ms", "Time to first token", _MS, tags)
        self.itl_ms = Histogram("speccascade_inter_token_latency_ms",
                                "Time between committed tokens (a round's time / its tokens)",
                                _MS, tags)
        self.num_draft_tokens = Histogram(
            "speccascade_num_draft_tokens", "Draft tokens (gamma) per round; 0 = a plain target step",
            [0.5 + g for g in range(17)], tags)
        self.inflight = Gauge("speccascade_router_inflight", "Requests in flight on this router")

    def round(self, mode: str, elapsed_ms: float, num_tokens: int) -> None:
        if num_tokens:
            self.itl_ms.observe(elapsed_ms / num_tokens, tags={"mode": mode})

    def finished(self, mode: str, status: str, stats: RequestStats | None,
                 num_tokens: int) -> None:
        self.requests.inc(tags={"mode": mode, "status": status})
        if stats is None:
            return
        tags = {"mode": mode}
        if stats.rounds:
            self.ttft_ms.observe(stats.ttft_ms, tags=tags)
        # Ray counters only take positive increments.
        for counter, value in ((self.tokens, num_tokens), (self.drafted, stats.drafted),
                               (self.accepted, stats.accepted),
                               (self.deferrals, stats.deferrals)):
            if value > 0:
                counter.inc(value, tags=tags)
        for gamma, rounds in enumerate(stats.gamma_histogram):
            for _ in range(rounds):  # Ray's Histogram takes one observation at a time
                self.num_draft_tokens.observe(gamma, tags=tags)
        if stats.drafted:
            self.acceptance_rate.observe(stats.acceptance_rate, tags=tags)
            self.mean_accepted_length.observe(stats.mean_accepted_length, tags=tags)


class ReplicaMetrics:
    def __init__(self, role: str):
        self.role = role
        self.live = Gauge("speccascade_live_sequences",
                          "KV-cache entries (live sequences) held by this replica",
                          tag_keys=("role",))
        self.live.set_default_tags({"role": role})
        self.kv_used = Gauge("speccascade_kv_tokens_used",
                             "Tokens held in this replica's KV cache", tag_keys=("role",))
        self.kv_used.set_default_tags({"role": role})
        self.kv_total = Gauge("speccascade_kv_tokens_total",
                              "Token capacity of this replica's KV cache", tag_keys=("role",))
        self.kv_total.set_default_tags({"role": role})

    def set_live(self, value: int, kv_used: int = 0, kv_total: int = 0) -> None:
        self.live.set(value)
        self.kv_used.set(kv_used)
        self.kv_total.set(kv_total)
