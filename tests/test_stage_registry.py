"""Issue 20: one stage list (contract/pipeline.py), one agent per stage (streams/agents.py), one
terminal test, and no stage name spelled anywhere else in the product."""

from __future__ import annotations

import ast
import itertools
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel

from contract.events import DONE, FAILED_SEQ, PIPELINE, PROGRESS, QUEUED, STAGES, SUCCESS_SEQS, seq_of
from contract.pipeline import SPEC, is_terminal, is_terminal_lua
from contract.settings import Settings
from contract.topics import FIRST_TOPIC, STAGE_TOPICS, TOPICS
from persistence import store
from streams import registry
from view import client

from .conftest import REPO

# --- the registry ------------------------------------------------------------------------------


def test_every_stage_has_its_agent_and_every_agent_its_stage() -> None:
    registry.check()
    assert list(registry.load()) == list(PIPELINE)


def test_check_names_the_stage_without_an_agent_and_the_agent_without_a_stage() -> None:
    with pytest.raises(
        registry.RegistryMismatch, match=r"no agent for stage\(s\) audit of contract/pipeline"
    ):
        registry.check((*PIPELINE, "audit"))
    last = PIPELINE[-1]
    with pytest.raises(
        registry.RegistryMismatch, match=rf"agent\(s\) {last} in streams/agents.py have no stage"
    ):
        registry.check(PIPELINE[:-1])


def test_a_worker_refuses_to_start_when_registry_and_pipeline_disagree(tmp_path: Path) -> None:
    """`python -m streams worker` exits with the names, before it touches Kafka."""
    script = (
        "import streams.registry as r, streams.__main__ as m\n"
        "r.load()\n"
        f"del r.REGISTRY[{PIPELINE[-1]!r}]\n"  # the stage's line is in contract/, its agent is not
        "m.main(['worker'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "ECO2_LOCAL_DIR": str(tmp_path), "ECO2_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
    )
    assert out.returncode == 3, out.stderr[-2000:]
    assert f"no agent for stage(s) {PIPELINE[-1]} of contract/pipeline.py" in out.stderr


def test_an_agent_may_not_take_a_stage_twice_nor_reuse_a_field() -> None:
    class Twice(BaseModel):
        other: int | None = None

    class Clash(BaseModel):
        job_id: str = ""

    async def agent(ctx: registry.Context, job: object) -> BaseModel:
        raise NotImplementedError

    with pytest.raises(registry.RegistryMismatch, match="has two agents"):
        registry.stage(PIPELINE[0], Twice)(agent)  # type: ignore[arg-type]
    with pytest.raises(registry.RegistryMismatch, match="job_id"):
        registry.stage("clash", Clash)(agent)  # type: ignore[arg-type]
    assert "clash" not in registry.REGISTRY


def test_scans_columns_come_from_the_stage_output_models() -> None:
    outputs = [f for name in PIPELINE for f in registry.REGISTRY[name].output.model_fields]
    names = [c.name for c in store.columns()]
    assert names[4 : 4 + len(outputs)] == outputs
    assert all(f"{c.name}" in store.write_sql() and c.name in store.fetch_sql() for c in store.columns())
    assert set(store.stage_column_ddl()) == set(outputs)
    kinds = {c.name: c.kind for c in store.columns()}
    assert all(kinds[f] in ("text", "jsonb") for f in outputs)


# --- everything derived from the one list ----------------------------------------------------


def test_stages_seqs_progress_and_topics_follow_the_pipeline() -> None:
    assert STAGES == (QUEUED, *PIPELINE, DONE)
    assert [seq_of(st, "completed") for st in PIPELINE] == [10 * (i + 1) + 1 for i in range(len(PIPELINE))]
    assert SUCCESS_SEQS[0] == 1 and SUCCESS_SEQS[-1] == seq_of(DONE, "completed") < FAILED_SEQ
    assert list(SUCCESS_SEQS) == sorted(set(SUCCESS_SEQS)) and len(SUCCESS_SEQS) == 2 * len(PIPELINE) + 2
    assert PROGRESS[PIPELINE[-1]] == PROGRESS[DONE] == 100
    assert [PROGRESS[st] for st in PIPELINE] == sorted(PROGRESS[st] for st in PIPELINE)
    assert list(STAGE_TOPICS) == list(PIPELINE) and FIRST_TOPIC == STAGE_TOPICS[PIPELINE[0]]
    assert [t.doc for t in TOPICS[: len(SPEC)]] == [st.doc for st in SPEC]
    assert Settings(_env_file=None).stages.split(",") == list(PIPELINE)  # type: ignore[call-arg]


@pytest.mark.integration
async def test_the_lua_terminal_test_is_the_python_one(settings: Settings) -> None:
    """The Redis apply script's terminal test is generated from `is_terminal`: run on Redis, it
    agrees on every stage and status (and a broken rendering would fail here)."""
    redis = client(settings.redis_url, "eco2-test-terminal")
    script = f"return {is_terminal_lua('ARGV[1]', 'ARGV[2]')} and 1 or 0"
    try:
        for stage, status in itertools.product([*STAGES, "nope"], ["started", "completed", "failed"]):
            got = await redis.eval(script, 0, stage, status)  # type: ignore[misc]
            assert bool(got) == is_terminal(stage, status), (stage, status)
    finally:
        await redis.aclose()


# --- no stage name outside contract/, tests, bench/ and the agents ---------------------------

# Outside these, a product file must not spell a pipeline stage name: it derives it from
# contract/pipeline.py. The agents spell their own. Generated manifests are checked against
# contract/ by tests/test_deploy.py. streams/model.py is the model client of the agents that call the
# model, and simmodel/ stands in for that model: "answer"/"classification" there are the names of
# the model's response schemas, and "rule" a key of the prompt's context, not stage names.
EXEMPT = ("contract/", "tests/", "bench/", "docs/", "streams/agents.py", "streams/model.py", "simmodel/")
GENERATED = ("deploy/strimzi/topics.yaml", "deploy/strimzi/users.yaml", "deploy/app/stages.yaml")


def stage_spellings(path: str, text: str, names: tuple[str, ...]) -> list[str]:
    """Where `text` spells one of `names`: a string literal that is the name or names its topic
    (scan.NAME); in Python read with the AST, so comments and identifiers do not count."""
    alternatives = "|".join(map(re.escape, names))
    topic = re.compile(rf"scan\.({alternatives})\b")
    found = []
    if path.endswith(".py"):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in names or topic.search(node.value):
                    found.append(f"{path}:{node.lineno}: {node.value[:60]!r}")
    else:
        quoted = re.compile(rf"""["'`]({alternatives})["'`]""")
        for n, line in enumerate(text.splitlines(), 1):
            if quoted.search(line) or topic.search(line):
                found.append(f"{path}:{n}: {line.strip()[:80]}")
    return found


def test_no_product_file_spells_a_stage_name() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    found = []
    for path in files.stdout.split():
        if path.startswith(EXEMPT) or path in GENERATED:
            continue
        if not path.endswith((".py", ".html", ".js", ".lua", ".sql", ".yaml", ".json", ".toml")):
            continue
        found += stage_spellings(path, (REPO / path).read_text(errors="replace"), PIPELINE)
    assert not found, "stage names spelled outside contract/ (derive them):\n" + "\n".join(found)


def test_the_stage_name_check_finds_what_it_looks_for() -> None:
    st = PIPELINE[1]
    assert stage_spellings("x.py", f'if stage == "{st}":\n    pass\n', PIPELINE)
    assert stage_spellings("x.py", f'TOPIC = "scan.{st}"\n', PIPELINE)
    assert stage_spellings("x.html", f'<li data-stage="{st}">', PIPELINE)
    assert not stage_spellings("x.py", f"# the {st} stage\n{st}_count = 1\n", PIPELINE)


@pytest.mark.integration
async def test_migration_adds_a_missing_stage_column_and_old_rows_stay_readable(settings: Settings) -> None:
    """A table from before a stage existed (its output column missing, rows in it) gets the column
    from the next migration run (derived, additive); the old row reads back with that output None,
    a new row stores it. In a schema of its own, dropped at the end."""
    import asyncpg

    from contract.events import ScanResult, now
    from persistence.migrate import migrate

    last = list(registry.REGISTRY[PIPELINE[-1]].output.model_fields)[-1]  # the newest stage's column
    schema = f"t_stage_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path TO {schema}")
        await migrate(conn)
        await conn.execute(f"ALTER TABLE scans DROP COLUMN {last}")  # as before the stage existed
        await conn.execute(
            "INSERT INTO scans (job_id, user_id, status, image_url, created_at, finished_at)"
            " VALUES ('old', 'u', 'completed', 'x', now(), now())"
        )
        assert await migrate(conn) == []  # no SQL file left to apply; the column comes back anyway
        old = await store.fetch_result(conn, "old")
        assert old is not None and old[last] is None and old["timings"] == {}
        new = ScanResult.model_validate(
            {
                "job_id": "new",
                "user_id": "u",
                "status": "completed",
                "image_url": "x",
                "created_at": now(),
                "finished_at": now(),
                last: {"kept": True},
            }
        )
        await store.write_batch(conn, [new])
        got = await store.fetch_result(conn, "new")
        assert got is not None and got[last] == {"kept": True}
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()
