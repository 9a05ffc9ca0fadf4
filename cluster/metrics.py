"""Prometheus metrics of a server, on their own HTTP port.

Labels: `model_name`, and `worker_type` = the role of the instance whose work a metric times (`prefill`,
`decode`, `colocated`), or `frontend` for whole-request metrics measured at the server. Latency histograms are
observed when a request finishes; gauges (running, waiting, KV usage) are read from the cluster at scrape time."""
from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.5, 0.75, 1.0, 2.5)
LABELS = ("model_name", "worker_type")


class _ClusterStateCollector:
    """Gauges computed from a snapshot of the cluster when Prometheus scrapes."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict | None]):
        self.model_name = model_name
        self.snapshot = snapshot

    def collect(self):
        running = GaugeMetricFamily("splitserve_num_requests_running",
                                    "Requests being prefilled, transferred or decoded", labels=LABELS)
        waiting = GaugeMetricFamily("splitserve_num_requests_waiting",
                                    "Requests waiting: at the frontend for an instance pair, or in an instance's "
                                    "queue", labels=LABELS)
        usage = GaugeMetricFamily("splitserve_kv_cache_usage_perc",
                                  "Fraction of KV cache blocks in use (0-1) over the instances of a role",
                                  labels=LABELS)
        try:
            snap = self.snapshot()
        except Exception as e:  # a scrape must never fail because the cluster is busy or gone
            log.warning("metrics snapshot failed: %s", e)
            snap = None
        if snap is not None:
            per_role: dict[str, dict[str, float]] = {}
            for inst in snap["instances"].values():
                agg = per_role.setdefault(inst["role"], {"running": 0, "waiting": 0, "used": 0, "total": 0})
                agg["running"] += inst.get("running", 0)
                agg["waiting"] += inst.get("waiting", 0)
                agg["used"] += inst.get("num_blocks", 0) - inst.get("free_blocks", 0)
                agg["total"] += inst.get("num_blocks", 0)
            for role, agg in sorted(per_role.items()):
                running.add_metric([self.model_name, role], agg["running"])
                waiting.add_metric([self.model_name, role], agg["waiting"])
                usage.add_metric([self.model_name, role], agg["used"] / agg["total"] if agg["total"] else 0.0)
            states = snap.get("requests", {})
            running.add_metric([self.model_name, "frontend"], sum(v for k, v in states.items() if k != "queued"))
            waiting.add_metric([self.model_name, "frontend"], states.get("queued", 0))
        yield running
        yield waiting
        yield usage
        yield from self._fleet(snap)

    def _fleet(self, snap: dict | None):
        """Instances by role and state, relaunches by role, requests moved off dead instances by reason."""
        instances = GaugeMetricFamily("splitserve_instances", "Instances by role and state",
                                      labels=("model_name", "role", "state"))
        restarts = CounterMetricFamily("splitserve_instance_restarts", "Instances relaunched after a death, by role",
                                       labels=("model_name", "role"))
        migrations = CounterMetricFamily("splitserve_request_migrations", "Requests moved off a dead instance, by "
                                         "reason", labels=("model_name", "reason"))
        if snap is not None:
            counts: dict[tuple[str, str], int] = {}
            for inst in snap["instances"].values():
                key = (inst["role"], inst.get("state", "serving"))
                counts[key] = counts.get(key, 0) + 1
            for (role, state), n in sorted(counts.items()):
                instances.add_metric([self.model_name, role, state], n)
            for role in sorted({inst["role"] for inst in snap["instances"].values()}):
                restarts.add_metric([self.model_name, role], snap.get("restarts", {}).get(role, 0))
            for reason, n in sorted(snap.get("migrations", {}).items()):
                migrations.add_metric([self.model_name, reason], n)
        yield instances
        yield restarts
        yield migrations
        yield from self._kv_counters(snap.get("counters", {}) if snap else {})
        yield from self._planner(snap.get("planner") if snap else None)

    def _kv_counters(self, counters: dict):
        """Prefix-cache lookups and hits by role, KV bytes moved into decode caches, and the time instances spent
        in steps (summed over every incarnation of every instance by the frontend)."""
        hits = CounterMetricFamily("splitserve_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                                   labels=LABELS)
        queries = CounterMetricFamily("splitserve_prefix_cache_queries_tokens", "Prompt tokens looked up in the "
                                      "prefix cache", labels=LABELS)
        moved = CounterMetricFamily("splitserve_kv_transfer_bytes", "KV cache bytes transferred from prefill into "
                                    "decode instances", labels=("model_name",))
        busy = CounterMetricFamily("splitserve_instance_busy_seconds", "Seconds instances spent in steps that ran a "
                                   "forward (scheduling, forward, sampling, KV pushes), by role", labels=LABELS)
        steps = CounterMetricFamily("splitserve_instance_steps", "Steps that ran a forward, by role", labels=LABELS)
        for family, key in ((hits, "prefix_hit_tokens"), (queries, "prefix_query_tokens"), (busy, "busy_s"),
                            (steps, "steps")):
            for role, n in sorted(counters.get(key, {}).items()):
                family.add_metric([self.model_name, role], n)
        moved.add_metric([self.model_name], sum(counters.get("kv_received_bytes", {}).values()))
        yield hits
        yield queries
        yield moved
        yield busy
        yield steps

    def _planner(self, planner: dict | None):
        """The online planner's last decision: observed rate, target counts, predicted attainment per candidate."""
        if planner is None:
            return
        rate = GaugeMetricFamily("splitserve_planner_observed_rate", "Arrival rate the planner observed (req/s)",
                                 labels=("model_name",))
        rate.add_metric([self.model_name], planner["observed_rate"])
        target = GaugeMetricFamily("splitserve_planner_target_instances", "Instances the planner aims for, by role",
                                   labels=("model_name", "role"))
        for role, n in sorted(planner["target"].items()):
            target.add_metric([self.model_name, role], n)
        predicted = GaugeMetricFamily("splitserve_planner_predicted_attainment", "Simulated SLO attainment of each "
                                      "candidate (prefill, decode) count", labels=("model_name", "candidate"))
        for candidate, value in sorted(planner["predicted"].items()):
            predicted.add_metric([self.model_name, candidate], value)
        scale = GaugeMetricFamily("splitserve_planner_latency_scale", "The planner's latency model calibration: "
                                  "timed over modelled step time (median over its window), by phase",
                                  labels=("model_name", "phase"))
        for phase, value in sorted(planner.get("latency_scale", {}).items()):
            scale.add_metric([self.model_name, phase], value)
        yield rate
        yield target
        yield predicted
        yield scale


class ServerMetrics:
    def __init__(self, model_name: str, snapshot: Callable[[], dict | None] | None = None,
                 registry: CollectorRegistry | None = None):
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def hist(name, doc, buckets=_LATENCY_BUCKETS):
            return Histogram(name, doc, LABELS, buckets=buckets, registry=r)

        self.ttft = hist("splitserve_time_to_first_token_seconds", "Arrival to first token")
        self.itl = hist("splitserve_inter_token_latency_seconds", "Gap between consecutive output tokens",
                        _ITL_BUCKETS)
        self.e2e = hist("splitserve_e2e_request_latency_seconds", "Arrival to finish")
        self.queue = hist("splitserve_request_queue_time_seconds", "Arrival to dispatch to a prefill instance")
        self.prefill = hist("splitserve_request_prefill_time_seconds", "Dispatch to first token")
        self.kv_transfer = hist("splitserve_kv_transfer_seconds", "First token to KV cache ready on decode")
        self.decode = hist("splitserve_request_decode_time_seconds", "First to last token")
        self.finished = Counter("splitserve_request_success", "Requests finished, by reason",
                                LABELS + ("finished_reason",), registry=r)
        self.failed = Counter("splitserve_request_failure", "Requests that ended with a gRPC error, by code",
                              LABELS + ("code",), registry=r)
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "Prompt tokens of finished requests", LABELS,
                                     registry=r)
        self.generation_tokens = Counter("splitserve_generation_tokens", "Output tokens of finished requests",
                                         LABELS, registry=r)
        if snapshot is not None:
            r.register(_ClusterStateCollector(model_name, snapshot))
        self._http = None

    def _labels(self, worker_type: str) -> dict:
        return {"model_name": self.model_name, "worker_type": worker_type}

    def observe_itl(self, gap_s: float, worker_type: str) -> None:
        self.itl.labels(**self._labels(worker_type)).observe(gap_s)

    def observe_finished(self, metrics: dict, finish_reason: str, prefill_role: str | None,
                         decode_role: str | None) -> None:
        """One finished request (metrics as the cluster reports them in its final chunk)."""
        front = self._labels("frontend")
        self.finished.labels(**front, finished_reason=finish_reason).inc()
        self.prompt_tokens.labels(**front).inc(metrics.get("prompt_tokens", 0))
        self.generation_tokens.labels(**front).inc(metrics.get("completion_tokens", 0))
        if metrics.get("e2e_s") is not None:
            self.e2e.labels(**front).observe(metrics["e2e_s"])
        if prefill_role:
            for hist, key in ((self.ttft, "ttft_s"), (self.queue, "queue_s"), (self.prefill, "prefill_s")):
                if metrics.get(key) is not None:
                    hist.labels(**self._labels(prefill_role)).observe(metrics[key])
        if decode_role:
            if metrics.get("kv_transfer_s") is not None:
                self.kv_transfer.labels(**self._labels(decode_role)).observe(metrics["kv_transfer_s"])
            if metrics.get("completion_tokens", 0) > 1:
                self.decode.labels(**self._labels(decode_role)).observe(metrics.get("decode_s") or 0.0)

    def observe_failed(self, code: str) -> None:
        self.failed.labels(**self._labels("frontend"), code=code).inc()

    def serve(self, host: str, port: int) -> int:
        """Starts the /metrics HTTP endpoint; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
