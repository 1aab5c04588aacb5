"""Operator commands say what happened, in a line, when there is nothing to do or a name is wrong
(no silence, no traceback): the runbooks promise these lines."""

from __future__ import annotations

from typing import Any

import pytest

from contract.settings import Settings
from eco2 import dlq

from .conftest import eco2


async def test_replay_all_of_an_empty_dead_letter_topic_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_letters(s: Settings, topic: str) -> list[Any]:
        return []

    monkeypatch.setattr(dlq, "read_letters", no_letters)
    said: list[str] = []
    failures = await dlq.replay(Settings(), "scan.dlq", None, None, False, echo=said.append)
    assert failures == 0
    assert said == ["scan.dlq: no dead letters, nothing to replay"]


def test_logs_of_an_unknown_service_name_the_known_ones_without_a_traceback() -> None:
    proc = eco2("stack", "logs", "no-such-service", check=False)
    assert proc.returncode == 1
    assert "unknown service 'no-such-service'" in proc.stderr and "gateway" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
