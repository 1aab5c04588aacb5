"""Reward characters and the grant decision."""

from __future__ import annotations

from typing import Any

import pytest

from catalog.rewards import CHARACTERS, DEFAULT_CHARACTER, character_for, decide
from catalog.rules import MAJOR_CATEGORIES, RECYCLABLE_MIDDLES
from contract.events import Reward

CLEAN_ANSWER = {"disposal_steps": ["Empty it"], "user_answer": "Do this.", "warnings": [], "gaps": []}


def cls(major: str, middle: str = "unknown") -> dict[str, Any]:
    return {
        "major_category": major,
        "middle_category": middle,
        "minor_category": "x",
        "situation_tags": [],
        "confidence": 0.9,
    }


def test_thirteen_characters_one_per_middle() -> None:
    assert len(CHARACTERS) == 13
    assert len({c.name for c in CHARACTERS.values()}) == 13
    for code, character in CHARACTERS.items():
        assert code == character.code and code.startswith("char_")
        assert character.name and character.description
    middles = [c.middle_category for c in CHARACTERS.values() if c.middle_category is not None]
    assert sorted(middles) == sorted(RECYCLABLE_MIDDLES)
    assert [c for c in CHARACTERS.values() if c.middle_category is None] == [DEFAULT_CHARACTER]
    for middle in RECYCLABLE_MIDDLES:
        assert character_for(middle).middle_category == middle
    assert character_for(None) is DEFAULT_CHARACTER
    assert character_for("medicine") is DEFAULT_CHARACTER


@pytest.mark.parametrize("middle", RECYCLABLE_MIDDLES)
def test_granted_with_the_middle_character(middle: str) -> None:
    reward = decide(cls("recyclable", middle), True, CLEAN_ANSWER)
    assert isinstance(reward, Reward)
    character = character_for(middle)
    assert character is not DEFAULT_CHARACTER
    assert reward == Reward(
        granted=True, character_code=character.code, character_name=character.name, reason="granted"
    )


def test_recyclable_unknown_middle_gets_the_mascot() -> None:
    reward = decide(cls("recyclable", "unknown"), True, CLEAN_ANSWER)
    assert reward.granted and reward.character_code == DEFAULT_CHARACTER.code
    assert reward.character_name == DEFAULT_CHARACTER.name


def test_pet_bottle_gets_char_pet() -> None:
    assert decide(cls("recyclable", "clear_pet"), True, CLEAN_ANSWER).character_code == "char_pet"


@pytest.mark.parametrize("major", [m for m in MAJOR_CATEGORIES if m != "recyclable"])
def test_not_recyclable(major: str) -> None:
    reward = decide(cls(major), True, CLEAN_ANSWER)
    assert reward == Reward(granted=False, reason="not_recyclable")


def test_no_classification() -> None:
    assert decide(None, True, CLEAN_ANSWER).reason == "not_recyclable"


def test_no_rule() -> None:
    reward = decide(cls("recyclable", "metal"), False, CLEAN_ANSWER)
    assert not reward.granted and reward.reason == "no_rule" and reward.character_code is None


@pytest.mark.parametrize(
    "answer",
    [
        {**CLEAN_ANSWER, "gaps": ["Could not tell whether the can held paint"]},
        {k: v for k, v in CLEAN_ANSWER.items() if k != "gaps"},
        {**CLEAN_ANSWER, "gaps": None},
        None,
    ],
)
def test_answer_with_gaps(answer: dict[str, Any] | None) -> None:
    reward = decide(cls("recyclable", "metal"), True, answer)
    assert not reward.granted and reward.reason == "answer_has_gaps" and reward.character_code is None


def test_blank_gaps_do_not_count() -> None:
    assert decide(cls("recyclable", "metal"), True, {**CLEAN_ANSWER, "gaps": ["", "  "]}).granted
