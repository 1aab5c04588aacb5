"""The capacity model of docs/operations.md as code: what a scan rate, a model latency and the
model provider's rate limit need in partitions, pods, concurrency and KEDA thresholds.

The constants are measurements (docs/benchmarks.md; shared 2-core box, so CPU figures are upper
bounds); `eco2 capacity` prints a plan and tests/test_topology_unit.py checks the shipped
manifests against it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from contract.events import PIPELINE
from contract.topics import EVENTS_PARTITIONS, STAGE_PARTITIONS

MODEL_CALLS_PER_JOB = 2  # vision and answer
EVENTS_PER_JOB = len(PIPELINE) * 2 + 2  # queued, started+completed per stage, done
WORKER_CPU_S_PER_JOB = 0.031  # all four stages, `eco2 bench scaleout` (29.8-31.0 ms)
PIPELINE_CPU_S_PER_JOB = 0.072  # API + stages + router + writer, upper figure of the pipeline runs
ROUTER_EVENTS_PER_S = 4_500  # one router process draining a backlog (4,360-4,649 measured)
GATEWAY_EVENTS_PER_S = 1_000  # one gateway: 10,000 clients, delivery p99 23 ms at this rate
GATEWAY_STREAMS = 10_000
MIN_REPLICAS_FOR_FAILOVER = 2


@dataclass(frozen=True)
class Plan:
    rate: float
    model_latency_s: float
    provider_rpm: float
    concurrency: int
    lag_threshold: int
    model_calls_per_min: float
    max_rate_by_provider: float
    max_rate_by_partitions: float
    in_flight_per_model_stage: float
    model_stage_pods: int  # what KEDA asks for: ceil(lag / lagThreshold)
    max_model_stage_pods_for_provider: int  # pods x concurrency must not outrun the rate limit
    fast_stage_pods: int
    worker_cpu_cores: float
    pipeline_cpu_cores: float
    events_per_s: float
    routers: int
    live_streams: float
    gateways: int
    writers: int
    feasible: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(
    rate: float,
    model_latency_s: float,
    provider_rpm: float,
    concurrency: int = 200,
    lag_threshold: int = 100,
) -> Plan:
    """Little's law per model stage (in flight = rate x latency), KEDA's ceil(lag / threshold),
    and the caps: partitions, the provider's requests per minute, measured per-process rates."""
    in_flight = rate * model_latency_s
    pods = max(1, math.ceil(in_flight / lag_threshold))
    provider_pods = math.floor(provider_rpm / 60 / MODEL_CALLS_PER_JOB * model_latency_s / concurrency)
    by_provider = provider_rpm / 60 / MODEL_CALLS_PER_JOB
    by_partitions = STAGE_PARTITIONS * lag_threshold / model_latency_s
    events = rate * EVENTS_PER_JOB
    streams = rate * (2 * model_latency_s + 1.0)
    routers = min(EVENTS_PARTITIONS, max(MIN_REPLICAS_FOR_FAILOVER, math.ceil(events / ROUTER_EVENTS_PER_S)))
    gateways = max(
        MIN_REPLICAS_FOR_FAILOVER,
        math.ceil(events / GATEWAY_EVENTS_PER_S),
        math.ceil(streams / GATEWAY_STREAMS),
    )
    return Plan(
        rate=rate,
        model_latency_s=model_latency_s,
        provider_rpm=provider_rpm,
        concurrency=concurrency,
        lag_threshold=lag_threshold,
        model_calls_per_min=rate * MODEL_CALLS_PER_JOB * 60,
        max_rate_by_provider=round(by_provider, 1),
        max_rate_by_partitions=round(by_partitions, 1),
        in_flight_per_model_stage=in_flight,
        model_stage_pods=pods,
        max_model_stage_pods_for_provider=min(STAGE_PARTITIONS, provider_pods),
        fast_stage_pods=1,
        worker_cpu_cores=round(rate * WORKER_CPU_S_PER_JOB, 2),
        pipeline_cpu_cores=round(rate * PIPELINE_CPU_S_PER_JOB, 2),
        events_per_s=events,
        routers=routers,
        live_streams=round(streams),
        gateways=gateways,
        writers=1,
        feasible=rate <= by_provider and pods <= STAGE_PARTITIONS and pods <= max(1, provider_pods),
    )


def provider_rpm_for(max_pods: int, model_latency_s: float, concurrency: int) -> float:
    """The rate limit under which `max_pods` pods x `concurrency` calls never exceed it."""
    return max_pods * concurrency / model_latency_s * MODEL_CALLS_PER_JOB * 60
