"""Prometheus text exposition for ``/metrics``: counters kept in memory, gauges read from the store."""

from __future__ import annotations

import bisect
import threading

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Request counts and a latency histogram per method; claims; webhook verdicts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        self.claims = 0
        self.claim_attempts = 0  # claims tried by dequeues, won or not (woken long-polls included)
        self.webhooks: dict[str, int] = {}

    def observe(self, method: str, status: int, seconds: float) -> None:
        method = method if method in ("GET", "POST", "HEAD") else "OTHER"
        with self.lock:
            self.requests[(method, status)] = self.requests.get((method, status), 0) + 1
            counts = self.hist.setdefault(method, [0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.sums[method] = self.sums.get(method, 0.0) + seconds

    def render(self, counts: dict[str, dict[str, int]]) -> str:
        out = ["# HELP fleetctl_tasks Tasks by state.", "# TYPE fleetctl_tasks gauge"]
        for state in ("queued", "assigned", "running", "awaiting_review", "completed", "failed", "cancelled"):
            out.append(f'fleetctl_tasks{{state="{state}"}} {counts["tasks"].get(state, 0)}')
        out += ["# HELP fleetctl_agents Agents by status.", "# TYPE fleetctl_agents gauge"]
        for status in ("online", "offline", "draining"):
            out.append(f'fleetctl_agents{{status="{status}"}} {counts["agents"].get(status, 0)}')
        with self.lock:
            out += ["# HELP fleetctl_claims_total Tasks claimed over the API.", "# TYPE fleetctl_claims_total counter",
                    f"fleetctl_claims_total {self.claims}"]  # fmt: skip
            out += [
                "# HELP fleetctl_claim_attempts_total Claims tried by dequeues, won or not.",
                "# TYPE fleetctl_claim_attempts_total counter",
                f"fleetctl_claim_attempts_total {self.claim_attempts}",
            ]
            out += ["# HELP fleetctl_webhook_deliveries_total Webhook deliveries by verdict.",
                    "# TYPE fleetctl_webhook_deliveries_total counter"]  # fmt: skip
            for verdict, n in sorted(self.webhooks.items()):
                out.append(f'fleetctl_webhook_deliveries_total{{verdict="{verdict}"}} {n}')
            out += ["# HELP fleetctl_http_requests_total HTTP requests by method and status.",
                    "# TYPE fleetctl_http_requests_total counter"]  # fmt: skip
            for (method, status), n in sorted(self.requests.items()):
                out.append(f'fleetctl_http_requests_total{{method="{method}",status="{status}"}} {n}')
            out += ["# HELP fleetctl_http_request_duration_seconds Request handling time.",
                    "# TYPE fleetctl_http_request_duration_seconds histogram"]  # fmt: skip
            for method, buckets in sorted(self.hist.items()):
                running = 0
                for bound, n in zip((*BUCKETS, "+Inf"), buckets, strict=True):
                    running += n
                    out.append(
                        f'fleetctl_http_request_duration_seconds_bucket{{method="{method}",le="{bound}"}} {running}'
                    )
                out.append(f'fleetctl_http_request_duration_seconds_sum{{method="{method}"}} {self.sums[method]:.6f}')
                out.append(f'fleetctl_http_request_duration_seconds_count{{method="{method}"}} {running}')
        return "\n".join(out) + "\n"
