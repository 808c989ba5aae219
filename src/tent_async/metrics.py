"""Prometheus metrics for an engine, through prometheus-client.

prometheus-client is the reference Python client: its custom-collector API
turns each scrape into one :meth:`Engine.telemetry` snapshot, so the metrics
are exactly what ``engine.telemetry()`` and the CLI show, with no second set of
counters to keep in step.  The snapshot is taken on the engine's event loop
(scrapes arrive on the HTTP server's thread), so every scrape is consistent.

    from tent_async.metrics import serve_metrics
    server = serve_metrics(engine, port=9464)   # http://host:9464/metrics
    ...
    server.close()

Metric names follow Prometheus conventions: ``tent_rail_*`` per rail
(labels ``engine``, ``rail``), ``tent_engine_*`` per engine.

An engine that has not started yet is not exported.  After an engine closed,
the endpoint keeps serving its final snapshot (:meth:`Engine.telemetry` after
close): counters frozen at the run's totals, nothing in flight, and
``tent_engine_running`` 0, until the engine is removed from the collector
(``server.collector.remove(engine)``) or the server is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .core.health import Health
from .errors import EngineClosedError
from .telemetry import Telemetry

if TYPE_CHECKING:
    from .engine import Engine


class EngineCollector(Collector):
    """Exposes one or more engines' telemetry to a Prometheus registry."""

    def __init__(self, engines: Iterable[Engine] = ()) -> None:
        self._engines: list[Engine] = list(engines)
        self._lock = threading.Lock()

    def add(self, engine: Engine) -> None:
        with self._lock:
            self._engines.append(engine)

    def remove(self, engine: Engine) -> None:
        with self._lock:
            if engine in self._engines:
                self._engines.remove(engine)

    def _snapshots(self) -> list[tuple[Telemetry, bool]]:
        """(snapshot, running) for each engine that has one: running, or closed with its final totals."""
        with self._lock:
            engines = list(self._engines)
        out = []
        for engine in engines:
            snap = _snapshot(engine)
            if snap is not None:
                out.append((snap, engine.running))
        return out

    def collect(self) -> Iterator[Any]:
        snaps = self._snapshots()
        rail_labels = ["engine", "rail"]
        gauges = {
            "bandwidth": GaugeMetricFamily(
                "tent_rail_bandwidth_bytes_per_second", "Learned bandwidth of the rail", labels=rail_labels
            ),
            "nominal": GaugeMetricFamily(
                "tent_rail_nominal_bandwidth_bytes_per_second",
                "Bandwidth hint the rail started from",
                labels=rail_labels,
            ),
            "latency": GaugeMetricFamily("tent_rail_latency_seconds", "Learned per-slice latency", labels=rail_labels),
            "slice": GaugeMetricFamily(
                "tent_rail_slice_bytes", "Size of the next slice on the rail", labels=rail_labels
            ),
            "inflight_bytes": GaugeMetricFamily("tent_rail_inflight_bytes", "Bytes in flight", labels=rail_labels),
            "inflight_slices": GaugeMetricFamily("tent_rail_inflight_slices", "Slices in flight", labels=rail_labels),
            "held": GaugeMetricFamily(
                "tent_rail_held", "1 while the peer's busy refusals hold new slices off the rail", labels=rail_labels
            ),
            "standing_by": GaugeMetricFamily(
                "tent_rail_standing_by",
                "1 while the rail stands by (healthy, held back while the rail it stands by for carries)",
                labels=rail_labels,
            ),
        }
        health = GaugeMetricFamily(
            "tent_rail_health", "1 for the rail's current health state", labels=[*rail_labels, "state"]
        )
        counters = {
            "bytes_total": CounterMetricFamily("tent_rail_bytes", "Bytes delivered", labels=rail_labels),
            "slices_total": CounterMetricFamily("tent_rail_slices", "Slices delivered", labels=rail_labels),
            "probes": CounterMetricFamily("tent_rail_probes", "Probe slices sent", labels=rail_labels),
            "errors": CounterMetricFamily("tent_rail_errors", "Slices that failed with an error", labels=rail_labels),
            "deadline_misses": CounterMetricFamily(
                "tent_rail_deadline_misses", "Slices that missed their deadline", labels=rail_labels
            ),
            "lag_excused": CounterMetricFamily(
                "tent_rail_lag_excused",
                "Deadlines that passed while the engine's event loop was late (not held against the rail)",
                labels=rail_labels,
            ),
            "rerouted": CounterMetricFamily(
                "tent_rail_rerouted_slices", "Slices taken off the rail to be sent elsewhere", labels=rail_labels
            ),
            "busy_refusals": CounterMetricFamily(
                "tent_rail_busy_refusals",
                "Slices the peer refused for its own load (a short hold, not a rail fault)",
                labels=rail_labels,
            ),
            "quarantines": CounterMetricFamily(
                "tent_rail_quarantines", "Times the rail was quarantined", labels=rail_labels
            ),
        }
        running = GaugeMetricFamily(
            "tent_engine_running", "1 while the engine runs, 0 once closed (its final totals)", labels=["engine"]
        )
        open_transfers = GaugeMetricFamily("tent_engine_open_transfers", "Transfers in progress", labels=["engine"])
        transfers = CounterMetricFamily("tent_engine_transfers", "Transfers that ended", labels=["engine", "outcome"])
        moved = CounterMetricFamily("tent_engine_bytes", "Bytes of completed transfers", labels=["engine"])
        lag = GaugeMetricFamily(
            "tent_engine_loop_lag_seconds",
            "How late the engine's timer ran (event-loop lag)",
            labels=["engine", "stat"],
        )
        backend = CounterMetricFamily(
            "tent_backend_events",
            "What the engine's backend counts beside its rails (ucx: refusals, protocol errors, direct copies)",
            labels=["engine", "event"],
        )
        for snap, is_running in snaps:
            for event, count in snap.backend:
                backend.add_metric([snap.engine, event], float(count))
            running.add_metric([snap.engine], 1.0 if is_running else 0.0)
            for rail in snap.rails:
                labels = [snap.engine, rail.name]
                gauges["bandwidth"].add_metric(labels, rail.bandwidth)
                gauges["nominal"].add_metric(labels, rail.nominal_bandwidth)
                gauges["latency"].add_metric(labels, rail.latency)
                gauges["slice"].add_metric(labels, rail.slice_size)
                gauges["inflight_bytes"].add_metric(labels, rail.inflight_bytes)
                gauges["inflight_slices"].add_metric(labels, rail.inflight_slices)
                gauges["held"].add_metric(labels, 1.0 if rail.held else 0.0)
                gauges["standing_by"].add_metric(labels, 1.0 if rail.standing_by else 0.0)
                for state in Health:
                    health.add_metric([*labels, state.value], 1.0 if rail.health == state.value else 0.0)
                for key, family in counters.items():
                    family.add_metric(labels, float(getattr(rail, key)))
            open_transfers.add_metric([snap.engine], snap.open_transfers)
            transfers.add_metric([snap.engine, "done"], snap.transfers_done)
            transfers.add_metric([snap.engine, "failed"], snap.transfers_failed)
            transfers.add_metric([snap.engine, "cancelled"], snap.transfers_cancelled)
            moved.add_metric([snap.engine], snap.bytes_done)
            lag.add_metric([snap.engine, "last"], snap.loop_lag_last)
            lag.add_metric([snap.engine, "max"], snap.loop_lag_max)
            lag.add_metric([snap.engine, "mean"], snap.loop_lag_mean)
        yield from gauges.values()
        yield health
        yield from counters.values()
        yield running
        yield open_transfers
        yield transfers
        yield moved
        yield lag
        yield backend


def _snapshot(engine: Engine) -> Telemetry | None:
    """The engine's telemetry, taken on its own event loop when called from another thread.

    ``None`` for an engine that never started; a closed engine's final snapshot
    is immutable and read directly.
    """
    if engine._state == "new":
        return None
    if engine._state == "closed":
        try:
            return engine.telemetry()
        except EngineClosedError:  # it failed to start: there is no snapshot
            return None
    loop = engine._loop
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is None or running is loop or loop.is_closed():
        return engine.telemetry()
    future: concurrent.futures.Future[Telemetry] = concurrent.futures.Future()

    def take() -> None:
        try:
            future.set_result(engine.telemetry())
        except BaseException as exc:  # the engine closed in between
            future.set_exception(exc)

    loop.call_soon_threadsafe(take)
    try:
        return future.result(timeout=2.0)
    except Exception:
        return None


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it."""

    def __init__(self, collector: EngineCollector, registry: CollectorRegistry, server: Any, thread: Any) -> None:
        self.collector = collector
        self.registry = registry
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(engine: Engine | None = None, port: int = 9464, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve Prometheus metrics for ``engine`` (more can be added) on ``addr:port``.

    ``port=0`` picks a free port; read it back from ``MetricsServer.port``.
    """
    registry = CollectorRegistry()
    collector = EngineCollector([engine] if engine is not None else [])
    registry.register(collector)
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(collector, registry, server, thread)
