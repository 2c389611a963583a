"""Prometheus metrics of ``lorart serve`` (text format at ``GET /metrics``, names prefixed
``lorart:``). Request series carry a ``model`` label that is the served model's name or a loaded
adapter's name, and nothing a client can choose freely, so label cardinality stays bounded by the
adapters an operator loads. Executor and LoRA cache figures are read from ``Executor.stats()``
at each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _ExecutorCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]], adapters: Callable[[], int]) -> None:
        self._stats, self._adapters = stats, adapters

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        lora = s["lora_cache"]
        gauges = {
            "num_requests_running": ("Requests in the running batch", s["running"]),
            "num_requests_waiting": ("Requests waiting for admission", s["queued"]),
            "kv_blocks_free": ("Free KV cache blocks", s["free_kv_blocks"]),
            "kv_blocks_used": (
                "KV cache blocks in use",
                s["total_kv_blocks"] - s["free_kv_blocks"],
            ),
            "lora_adapters_loaded": ("Adapters the server knows by name", self._adapters()),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"lorart:{name}", doc, value=value)
        for name, doc, key in (
            ("lora_cache_hits", "LoRA cache lookups that found the task on the device", "hits"),
            ("lora_cache_misses", "LoRA cache lookups that had to load the task", "misses"),
        ):
            yield CounterMetricFamily(f"lorart:{name}", doc, value=lora[key])
        evictions = CounterMetricFamily(
            "lorart:lora_cache_evictions", "LoRA tasks evicted, per cache level", labels=["level"]
        )
        evictions.add_metric(["host"], lora["host_evictions"])
        evictions.add_metric(["device"], lora["device_evictions"])
        yield evictions
        for metric, doc, key in (
            ("lora_cache_bytes", "Bytes of adapters held, per cache level", "bytes"),
            ("lora_adapters_resident", "Adapters held, per cache level", "tasks"),
        ):
            family = GaugeMetricFamily(f"lorart:{metric}", doc, labels=["level"])
            family.add_metric(["host"], lora[f"host_{key}"])
            family.add_metric(["device"], lora[f"device_{key}"])
            yield family


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], adapters: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorart:requests",
            "Finished requests by model (base or adapter) and finish reason",
            ["model", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lorart:prompt_tokens", "Prompt tokens of finished requests", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "lorart:generation_tokens", "Generated tokens", ["model"], registry=r
        )
        self.ttft = Histogram(
            "lorart:time_to_first_token_seconds",
            "Seconds from arrival to the first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "lorart:time_per_output_token_seconds",
            "Seconds per generated token after the first",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lorart:e2e_request_latency_seconds",
            "Seconds from arrival to the final response",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_ExecutorCollector(stats, adapters))
        self._reasons: set[tuple[str, str]] = set()  # (model, finish_reason) series made

    def finished(
        self,
        model: str,
        finish_reason: str,
        prompt_tokens: int,
        generated: int,
        first_token: float | None,
        total: float,
    ) -> None:
        self.requests.labels(model, finish_reason).inc()
        self._reasons.add((model, finish_reason))
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(generated)
        self.e2e.labels(model).observe(total)
        if first_token is not None:
            self.ttft.labels(model).observe(first_token)
            if generated > 1:
                self.tpot.labels(model).observe((total - first_token) / (generated - 1))

    def forget(self, model: str) -> None:
        """Drops an unloaded adapter's series, keeping the label set bounded."""
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.e2e):
            try:
                metric.remove(model)
            except KeyError:
                pass
        for labels in [k for k in self._reasons if k[0] == model]:
            self.requests.remove(*labels)
            self._reasons.discard(labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
