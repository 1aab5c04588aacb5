"""The rule base: complete entries for every category, lookup, fallback and model schemas."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest

from catalog import rules
from catalog.rules import (
    ALL_MIDDLES,
    FALLBACK_ANSWER,
    MAJOR_CATEGORIES,
    MIDDLE_CATEGORIES,
    RULE_FIELDS,
    SITUATION_TAGS,
    answer_schema,
    classification_schema,
    is_recyclable,
    lookup,
    situation_advice,
)

RULED_MAJORS = [m for m in MAJOR_CATEGORIES if m != "unclassified"]
ALL_PAIRS = [(major, middle) for major in MAJOR_CATEGORIES for middle in MIDDLE_CATEGORIES[major]]


def classification(major: str, middle: str = "unknown", tags: list[str] | None = None) -> dict[str, Any]:
    return {
        "major_category": major,
        "middle_category": middle,
        "minor_category": "some item",
        "situation_tags": tags or [],
        "confidence": 0.9,
    }


def assert_complete(rule: dict[str, Any]) -> None:
    for field in RULE_FIELDS:
        assert rule.get(field), f"missing or empty {field}"
    assert isinstance(rule["name"], str) and isinstance(rule["description"], str)
    for field in ("targets", "common_steps", "detailed_steps", "pictogram"):
        assert all(isinstance(x, str) and x.strip() for x in rule[field]), field
    assert 2 <= len(rule["targets"]) <= 5
    assert 3 <= len(rule["detailed_steps"]) <= 6
    assert 2 <= len(rule["not_here"]) <= 4
    for entry in rule["not_here"]:
        assert entry["item"].strip() and entry["goes_to"].strip()
    for sub in rule["sub_items"]:
        assert sub["name"].strip() and sub["note"].strip()
    for tag, advice in rule.get("situation_advice", {}).items():
        assert tag in SITUATION_TAGS and advice.strip()


def test_category_constants() -> None:
    assert len(MAJOR_CATEGORIES) == 8
    assert set(MIDDLE_CATEGORIES) == set(MAJOR_CATEGORIES)
    assert len(MIDDLE_CATEGORIES["recyclable"]) == 12
    assert len(ALL_MIDDLES) == len(set(ALL_MIDDLES)), "a middle category belongs to one major"
    assert "unknown" not in ALL_MIDDLES


@pytest.mark.parametrize("major", RULED_MAJORS)
def test_every_major_has_a_complete_rule(major: str) -> None:
    assert_complete(rules.rule_base()[major])


@pytest.mark.parametrize(("major", "middle"), ALL_PAIRS)
def test_every_middle_has_a_complete_rule(major: str, middle: str) -> None:
    assert_complete(rules.rule_base()[f"{major}/{middle}"])


def test_rule_base_holds_only_known_keys() -> None:
    known = set(RULED_MAJORS) | {f"{a}/{b}" for a, b in ALL_PAIRS}
    assert set(rules.rule_base()) == known


@pytest.mark.parametrize(("major", "middle"), ALL_PAIRS)
def test_lookup_middle(major: str, middle: str) -> None:
    match = lookup(classification(major, middle))
    assert match is not None
    assert (match.key, match.major, match.middle) == (f"{major}/{middle}", major, middle)
    assert match.rule == rules.rule_base()[match.key]


@pytest.mark.parametrize("major", RULED_MAJORS)
def test_lookup_major_level(major: str) -> None:
    match = lookup(classification(major, "unknown"))
    assert match is not None
    assert (match.key, match.major, match.middle) == (major, major, None)
    assert match.rule["name"] == rules.rule_base()[major]["name"]


def test_lookup_middle_of_another_major_falls_back_to_the_major() -> None:
    match = lookup(classification("general_waste", "clear_pet"))
    assert match is not None and match.key == "general_waste" and match.middle is None


@pytest.mark.parametrize(
    "cls",
    [
        classification("unclassified"),
        classification("unclassified", "clear_pet"),
        classification("spaceship", "clear_pet"),
        {"middle_category": "clear_pet"},
        {},
    ],
)
def test_lookup_no_match(cls: dict[str, Any]) -> None:
    assert lookup(cls) is None


def test_lookup_returns_a_private_copy() -> None:
    match = lookup(classification("recyclable", "clear_pet"))
    assert match is not None
    match.rule["common_steps"].clear()
    again = lookup(classification("recyclable", "clear_pet"))
    assert again is not None and again.rule["common_steps"]


def test_clear_pet_rule_says_label_off_crush_cap_on() -> None:
    text = " ".join(rules.rule_base()["recyclable/clear_pet"]["detailed_steps"]).lower()
    for word in ("empty", "rinse", "label", "crush", "cap"):
        assert word in text


def test_is_recyclable() -> None:
    assert is_recyclable(classification("recyclable", "metal"))
    assert is_recyclable(classification("recyclable"))
    assert not is_recyclable(classification("food_waste"))
    assert not is_recyclable({})
    assert not is_recyclable(None)


def test_classification_schema_enums_match_constants() -> None:
    props = classification_schema()["properties"]
    assert props["major_category"]["enum"] == list(MAJOR_CATEGORIES)
    assert set(props["middle_category"]["enum"]) == set(ALL_MIDDLES) | {"unknown"}
    assert props["situation_tags"]["items"]["enum"] == list(SITUATION_TAGS)


@pytest.mark.parametrize("schema_fn", [classification_schema, answer_schema])
def test_schemas_are_strict_mode_shaped(schema_fn: Any) -> None:
    schema = schema_fn()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"])


def test_classification_schema_validates_samples() -> None:
    schema = classification_schema()
    good = classification("recyclable", "clear_pet", ["label_attached", "cap_attached"])
    jsonschema.validate(good, schema)
    jsonschema.validate(classification("unclassified", "unknown"), schema)
    bad_cases = [
        {**good, "major_category": "spaceship"},
        {**good, "middle_category": "banana"},
        {**good, "situation_tags": ["on_fire"]},
        {**good, "confidence": 1.5},
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "minor_category"},
    ]
    for bad in bad_cases:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_answer_schema_and_fallback() -> None:
    schema = answer_schema()
    jsonschema.validate(FALLBACK_ANSWER, schema)
    assert FALLBACK_ANSWER["disposal_steps"] and FALLBACK_ANSWER["user_answer"]
    assert FALLBACK_ANSWER["gaps"], "the fallback answer admits it has gaps"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**FALLBACK_ANSWER, "gaps": "none"}, schema)
    copy_ = rules.fallback_answer()
    copy_["gaps"].clear()
    assert FALLBACK_ANSWER["gaps"]


def test_situation_advice() -> None:
    pet = rules.rule_base()["recyclable/clear_pet"]
    glass = rules.rule_base()["recyclable/glass_bottle"]
    # Rule-specific advice wins: a clear PET bottle keeps its cap, a glass bottle loses it.
    assert situation_advice(pet, ["cap_attached"]) == [pet["situation_advice"]["cap_attached"]]
    assert situation_advice(glass, ["cap_attached"]) == [glass["situation_advice"]["cap_attached"]]
    assert situation_advice(pet, ["cap_attached"]) != situation_advice(glass, ["cap_attached"])
    # Generic advice otherwise, in SITUATION_TAGS order, unknown tags ignored, no duplicates.
    advice = situation_advice(None, ["wet", "contents_left", "nonsense", "wet"])
    assert advice == [rules.SITUATION_ADVICE["contents_left"], rules.SITUATION_ADVICE["wet"]]
    assert situation_advice(pet, []) == []
    rule = copy.deepcopy(pet)
    rule.pop("situation_advice")
    assert situation_advice(rule, ["cap_attached"]) == [rules.SITUATION_ADVICE["cap_attached"]]
