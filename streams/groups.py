"""Refuse a stage worker whose stages another live consumer group already runs.

A worker's consumer group is derived from its `--stages` (`contract.topics.stage_group`). Two
workers with different stage sets that share a stage are two groups on that stage's topic: each
group gets every message, so every job would be processed twice. Workers of one component must
run the same `--stages` (Kubernetes: one Deployment per stage; locally: ECO2_STAGES for all
ECO2_WORKER_PROCESSES).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from contract.settings import Settings
from contract.topics import stage_group

PREFIX = stage_group([])  # "eco2-stage-"
log = logging.getLogger("eco2.streams.groups")


def stages_of(group: str) -> set[str]:
    """The stages a stage-worker group runs (stage names contain no '-')."""
    return set(group[len(PREFIX) :].split("-")) if group.startswith(PREFIX) else set()


# The Kafka client id of workers started with ECO2_STAGE_OVERLAP_OK (the broker starts every
# member id with its client id, so other workers can tell them apart and ignore them).
OVERLAP_OK_CLIENT_ID = "eco2-stage-overlap-ok"


def _live_groups(responses: list[Any]) -> set[str]:
    """Group ids of DescribeGroups responses that have members right now (deliberate private
    groups, whose members all run with ECO2_STAGE_OVERLAP_OK, do not count)."""
    live: set[str] = set()
    for resp in responses:
        for g in resp.groups:
            # (error_code, group_id, group_state, protocol_type, protocol, members, ...)
            members = [m for m in g[5] if not str(m[0]).startswith(OVERLAP_OK_CLIENT_ID)]
            if g[0] == 0 and members:
                live.add(g[1])
    return live


async def overlapping_groups(s: Settings, stages: list[str]) -> list[str]:
    """Other stage-worker groups with live members that read one of `stages`' topics."""
    own = stage_group(stages)
    admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap, **s.kafka_client_kwargs())
    await admin.start()
    try:
        listed = [g[0] for g in await admin.list_consumer_groups()]
        others = [g for g in listed if g != own and stages_of(g) & set(stages)]
        # One group per request: aiokafka 0.14 cannot decode Kafka 4's DescribeGroups response for
        # several groups ("Buffer underrun decoding string", the connection closed): the soak saw
        # this check fail every 30 s once two other stage groups existed.
        responses = [(await admin.describe_consumer_groups([g]))[0] for g in others]
        return sorted(_live_groups(responses))
    finally:
        await admin.close()


class OverlappingStages(RuntimeError):
    pass


# How often a running worker looks again: two workers with different stage sets started at the
# same moment both pass the start-up check (neither group has members yet).
RECHECK_S = 30.0


def _message(clash: list[str], stages: list[str], what: str) -> str:
    shared = sorted(set().union(*map(stages_of, clash)) & set(stages))
    return (
        f"{what}: consumer group(s) {', '.join(clash)} already run {', '.join(shared)}; a worker with "
        f"--stages {','.join(stages)} (group {stage_group(stages)}) would process every job of "
        "those stages a second time. Run every worker with the same --stages (ECO2_STAGES), "
        "or stop the other group first."
    )


async def _clash(s: Settings, stages: list[str]) -> list[str]:
    """Overlapping live groups; none when the broker will not list groups (a KafkaUser without
    Describe on them, as in Kubernetes, where every stage has its own Deployment and group)."""
    try:
        return await overlapping_groups(s, stages)
    except Exception as exc:
        log.warning("could not check for overlapping stage groups (%s)", exc)
        return []


async def refuse_overlap(s: Settings, stages: list[str]) -> None:
    """Raise OverlappingStages if another live group runs one of `stages`."""
    clash = await _clash(s, stages)
    if clash:
        raise OverlappingStages(_message(clash, stages, "refusing to start"))


async def watch_overlap(
    s: Settings, stages: list[str], on_clash: Callable[[str], None], every_s: float = RECHECK_S
) -> None:
    """Check again every `every_s` while running; call `on_clash` (which stops the worker)."""
    while True:
        await asyncio.sleep(every_s)
        clash = await _clash(s, stages)
        if clash:
            on_clash(_message(clash, stages, "stopping"))
            return
