"""``GET /metrics``: the Prometheus text format, written by hand (no client library).

Counters count what the gateway's monitor saw since the gateway started; compute
rates with PromQL's ``rate()``. Gauges are the latest report of each agent and of
the engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .feeds import Observer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class GatewayCounts:
    """The gateway's own figures."""

    chat_requests: int = 0
    chat_rate_limited: int = 0
    streams_open: int = 0
    started: float = field(default_factory=time.time)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
        number = str(int(value)) if float(value).is_integer() else repr(float(value))
        lines.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")
    return lines


def render(observer: Observer, counts: GatewayCounts, *, bus_up: bool) -> str:
    """Every metric, as one text/plain page."""
    now = time.time()
    agents = observer.agent_list(now)
    beats = {a.name: a for a in observer.agents.values() if a.beat is not None}
    engine = observer.engine
    lines: list[str] = []
    lines += _family(
        "chorus_bus_up",
        "gauge",
        "1 when the gateway is connected to the bus",
        [({}, 1.0 if bus_up else 0.0)],
    )
    lines += _family(
        "chorus_bus_messages_total",
        "counter",
        "bus envelopes seen by the gateway's monitor, by topic",
        [({"topic": topic}, n) for topic, n in sorted(observer.messages.items())],
    )
    lines += _family(
        "chorus_bus_monitor_dropped_total",
        "counter",
        "envelopes the gateway's monitor was too slow to take",
        [({}, observer.dropped)],
    )
    lines += _family(
        "chorus_agent_up",
        "gauge",
        "1 when the agent's last report is recent and it is not given up",
        [({"agent": a.name}, 1.0 if a.state not in ("silent", "gave_up") else 0.0) for a in agents],
    )
    lines += _family(
        "chorus_agent_restarts_total",
        "counter",
        "restarts of each process by the supervisor",
        [({"agent": name}, n) for name, n in sorted(observer.restarts.items())],
    )
    lines += _family(
        "chorus_agent_queue_depth",
        "gauge",
        "work waiting in each agent, from its last heartbeat",
        [({"agent": name}, a.beat.queue_depth) for name, a in sorted(beats.items()) if a.beat],
    )
    lines += _family(
        "chorus_agent_load",
        "gauge",
        "each agent's load, from its last heartbeat",
        [({"agent": name}, a.beat.load) for name, a in sorted(beats.items()) if a.beat],
    )
    lines += _family(
        "chorus_agent_last_heartbeat_seconds",
        "gauge",
        "unix time of each agent's last heartbeat",
        [({"agent": a.name}, a.last_heartbeat) for a in agents if a.last_heartbeat is not None],
    )
    if engine is not None:
        for name, help_text, value in (
            ("tokens_per_second", "tokens per second the engine generates", engine.tokens_per_s),
            ("cache_fill_ratio", "how full the sessions' caches are, 0..1", engine.cache_fill),
            ("sessions", "open engine sessions", engine.sessions),
            ("active_requests", "requests the engine serves now", engine.active_requests),
            ("resident_megabytes", "the engine's resident memory", engine.resident_mb),
        ):
            lines += _family(
                f"chorus_engine_{name}", "gauge", help_text, [({"device": engine.device}, value)]
            )
    lines += _family(
        "chorus_gateway_chat_requests_total",
        "counter",
        "POST /v1/chat requests accepted",
        [({}, counts.chat_requests)],
    )
    lines += _family(
        "chorus_gateway_chat_rate_limited_total",
        "counter",
        "POST /v1/chat requests refused by the rate limit",
        [({}, counts.chat_rate_limited)],
    )
    lines += _family(
        "chorus_gateway_streams_open",
        "gauge",
        "Server-Sent Event responses open now",
        [({}, counts.streams_open)],
    )
    lines += _family(
        "chorus_gateway_start_time_seconds",
        "gauge",
        "unix time the gateway started",
        [({}, counts.started)],
    )
    return "\n".join(lines) + "\n"
