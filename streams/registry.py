"""The stage registry: each stage's agent is one function registered under its stage name.

`@stage(name, Output)` registers an agent: an async function (context, job) -> Output, where
`Output` is a pydantic model whose fields are what the stage adds to the job (and to the stored
result: persistence/store.py derives its columns from these models). `@stage(..., model_free=True)`
marks an agent that calls no model and nothing else outside the process (a lookup, a rule): the
engine may run it before it knows whether a redelivery's output is stored already, and claim its
`started` event, output and `completed` in one Redis round trip (streams/stages.py). The agents
themselves live in `streams/agents.py`; `check()` (run when a worker starts) names every stage of
`contract.pipeline.PIPELINE` without an agent and every agent without a stage.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from contract.events import PIPELINE, ScanJob
from contract.settings import Settings


class Context(Protocol):
    """What an agent may use from the worker that runs it."""

    s: Settings

    def model(self) -> Any:
        """An OpenAI-compatible client (streams/model.py) for this call."""

    async def retried(self, stage: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """`call()` with the stage timeout and retries of transient model errors."""


Out = TypeVar("Out", bound=BaseModel)
Agent = Callable[[Context, ScanJob], Awaitable[Out]]


@dataclass(frozen=True)
class StageAgent:
    name: str
    output: type[BaseModel]
    run: Callable[[Context, ScanJob], Awaitable[BaseModel]]
    model_free: bool = False  # no model call, no side effect: cheap to run again on a redelivery


REGISTRY: dict[str, StageAgent] = {}

# Fields of the job and the result that are not any stage's output: no stage may reuse them.
_RESERVED = {"job_id", "user_id", "image_url", "user_input", "model", "created_at", "timings"}
_RESERVED |= {"status", "error", "failed_stage", "finished_at"}


class RegistryMismatch(RuntimeError):
    """The agents and contract.pipeline.PIPELINE do not describe the same stages."""


def stage(name: str, output: type[Out], model_free: bool = False) -> Callable[[Agent[Out]], Agent[Out]]:
    """Register the decorated function as the agent of stage `name`, adding `output`'s fields."""

    def register(fn: Agent[Out]) -> Agent[Out]:
        if name in REGISTRY:
            raise RegistryMismatch(f"stage {name!r} has two agents: {REGISTRY[name].run.__qualname__} and "
                                   f"{fn.__qualname__}")
        clash = set(output.model_fields) & (_RESERVED | set(output_fields()))
        if clash:
            raise RegistryMismatch(f"stage {name!r} outputs {sorted(clash)}, already fields of the job "
                                   "or of another stage's output")
        REGISTRY[name] = StageAgent(name, output, fn, model_free)  # type: ignore[arg-type]
        return fn

    return register


def load() -> dict[str, StageAgent]:
    """The registry with every agent of the product registered (importing `streams.agents`)."""
    from . import agents  # noqa: F401  (registers its agents on import)

    return REGISTRY


def check(pipeline: tuple[str, ...] = PIPELINE) -> None:
    """Refuse to run when a stage of the pipeline has no agent or an agent has no stage."""
    registry = load()
    missing = [st for st in pipeline if st not in registry]
    extra = [name for name in registry if name not in pipeline]
    problems = []
    if missing:
        problems.append(
            f"no agent for stage(s) {', '.join(missing)} of contract/pipeline.py: add a function "
            "decorated with @stage(NAME, OutputModel) to streams/agents.py"
        )
    if extra:
        problems.append(
            f"agent(s) {', '.join(extra)} in streams/agents.py have no stage in contract/pipeline.py: "
            "add a Stage(...) line to SPEC"
        )
    if problems:
        raise RegistryMismatch("; ".join(problems))


def output_fields() -> dict[str, type]:
    """Every stage output field and its annotation, in pipeline order (as registered)."""
    order = {name: i for i, name in enumerate(PIPELINE)}
    out: dict[str, type] = {}
    for agent in sorted(REGISTRY.values(), key=lambda a: order.get(a.name, len(order))):
        for field, info in agent.output.model_fields.items():
            out[field] = info.annotation  # type: ignore[assignment]
    return out


def is_text(annotation: Any) -> bool:
    """A `str` (or optional `str`) output is a text column; anything else is stored as JSON."""
    if annotation is str:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args == [str]
    return False
