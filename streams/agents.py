"""The stage agents: one function per stage of contract/pipeline.py, registered with `@stage`.

A new stage's agent is appended here (with its output model): the fields of the output model are
what the stage adds to the job on its way and to the stored result (persistence/store.py adds a
column per field: text for a `str`, JSONB otherwise). The agent gets the job as the previous stages
left it; model calls go through `ctx.retried(...)` for the stage timeout and retries. An agent that
calls no model (nor anything else outside the process) says so with `model_free=True`: it saves its
stage a Redis round trip per job.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from catalog import rewards, rules
from contract.events import ScanJob

from . import model
from .registry import Context, stage


class VisionOutput(BaseModel):
    classification: dict[str, Any] | None = None


@stage("vision", VisionOutput)
async def vision(ctx: Context, job: ScanJob) -> VisionOutput:
    """Classify the image (a model call)."""
    found = await ctx.retried("vision", lambda: model.classify(ctx.model(), ctx.s, job))
    return VisionOutput(classification=found)


class RuleOutput(BaseModel):
    rules_key: str | None = None
    rules: dict[str, Any] | None = None


@stage("rule", RuleOutput, model_free=True)
async def rule(ctx: Context, job: ScanJob) -> RuleOutput:
    """Look the classification up in the rule base (no model call)."""
    match = rules.lookup(job.classification or {})
    return RuleOutput(rules_key=match.key if match else None, rules=match.rule if match else None)


class AnswerOutput(BaseModel):
    answer: dict[str, Any] | None = None


@stage("answer", AnswerOutput)
async def answer(ctx: Context, job: ScanJob) -> AnswerOutput:
    """Write the disposal answer (a model call), or the fixed answer when no rule matched."""
    if job.rules is None:
        return AnswerOutput(answer=dict(rules.FALLBACK_ANSWER))
    advice = rules.situation_advice(job.rules, (job.classification or {}).get("situation_tags", []))
    written = await ctx.retried("answer", lambda: model.write_answer(ctx.model(), ctx.s, job, advice))
    return AnswerOutput(answer=written)


class RewardOutput(BaseModel):
    reward: dict[str, Any] | None = None


@stage("reward", RewardOutput, model_free=True)
async def reward(ctx: Context, job: ScanJob) -> RewardOutput:
    """Grant a character when the scan earned one."""
    decided = rewards.decide(job.classification, job.rules is not None, job.answer)
    return RewardOutput(reward=decided.model_dump())
