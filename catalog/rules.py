"""The rule base: waste categories, the model output schemas and rule lookup.

The rule stage looks up a classification here without a model call; the vision and answer
stages send `classification_schema()` / `answer_schema()` as strict JSON-schema output formats,
so the category names the model may emit are exactly the ones the rule base knows.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

RULES_FILE = Path(__file__).parent / "data" / "rules.json"

MAJOR_CATEGORIES: tuple[str, ...] = (
    "recyclable",
    "general_waste",
    "non_combustible",
    "food_waste",
    "bulky_waste",
    "construction_waste",
    "household_hazardous",
    "unclassified",
)

MIDDLE_CATEGORIES: dict[str, tuple[str, ...]] = {
    "recyclable": (
        "paper",
        "paper_pack",
        "clear_pet",
        "plastic",
        "vinyl",
        "styrofoam",
        "glass_bottle",
        "metal",
        "textile",
        "battery",
        "lighting",
        "electronics",
    ),
    "general_waste": (),
    "non_combustible": (),
    "food_waste": (),
    "bulky_waste": (),
    "construction_waste": (),
    "household_hazardous": ("medicine", "paint"),
    "unclassified": (),
}

RECYCLABLE_MIDDLES: tuple[str, ...] = MIDDLE_CATEGORIES["recyclable"]
ALL_MIDDLES: tuple[str, ...] = tuple(m for major in MAJOR_CATEGORIES for m in MIDDLE_CATEGORIES[major])
UNKNOWN_MIDDLE = "unknown"

# What the vision model may notice about the item's state; each has a generic advice line.
SITUATION_ADVICE: dict[str, str] = {
    "contents_left": "Empty the contents first.",
    "food_residue": "Rinse or wipe off food residue; if it will not come off, use the general waste bag.",
    "label_attached": "Remove the label and sort it by its own material.",
    "cap_attached": "Remove the cap and sort it by its own material.",
    "mixed_material": "Separate parts of different materials; inseparable items go to the general waste bag.",
    "contaminated": "Clean it first; items too dirty to clean go to the general waste bag.",
    "broken": "Wrap broken or sharp pieces in newspaper before putting them out.",
    "wet": "Let it dry before putting it out.",
    "oversized": "If it does not fit a bag, report it to the district office as bulky waste.",
    "battery_inside": "Take out the battery and put it in a battery collection box.",
}
SITUATION_TAGS: tuple[str, ...] = tuple(SITUATION_ADVICE)

# Fields every rule entry in rules.json carries.
RULE_FIELDS: tuple[str, ...] = (
    "name",
    "description",
    "targets",
    "sub_items",
    "common_steps",
    "detailed_steps",
    "not_here",
    "pictogram",
)

# The answer when no rule matched: same shape as a model answer, no model call, never rewarded.
FALLBACK_ANSWER: dict[str, Any] = {
    "disposal_steps": [
        "Check the item's material and the label on the packaging for a recycling mark.",
        "If you are unsure, ask your district office or community service centre how to dispose of it.",
        "Until then, keep it out of the recycling bins; small non-hazardous items can go in the "
        "volume-based fee bag for general waste.",
    ],
    "user_answer": (
        "We could not identify a disposal rule for this item. Please check with your district office "
        "or community service centre; if it is small and not hazardous, the general waste fee bag is "
        "the safe choice."
    ),
    "warnings": ["Do not put batteries, lamps, medicines or chemicals in the general waste bag."],
    "gaps": ["No disposal rule matched this item."],
}


def fallback_answer() -> dict[str, Any]:
    """A private copy of FALLBACK_ANSWER, safe to change."""
    return copy.deepcopy(FALLBACK_ANSWER)


@cache
def rule_base() -> dict[str, dict[str, Any]]:
    """All rule entries by key ("recyclable", "recyclable/clear_pet", ...); read once."""
    data = json.loads(RULES_FILE.read_text(encoding="utf-8"))
    rules: dict[str, dict[str, Any]] = data["rules"]
    return rules


def rule_key(major: str, middle: str | None = None) -> str:
    return f"{major}/{middle}" if middle else major


@dataclass
class RuleMatch:
    key: str
    major: str
    middle: str | None
    rule: dict[str, Any]


def lookup(classification: dict[str, Any]) -> RuleMatch | None:
    """The rule for (major, middle), else the major's own rule; None when neither exists."""
    major = classification.get("major_category")
    middle = classification.get("middle_category")
    if major not in MAJOR_CATEGORIES:
        return None
    rules = rule_base()
    if middle in MIDDLE_CATEGORIES[major]:
        key = rule_key(major, middle)
        if key in rules:
            return RuleMatch(key=key, major=major, middle=middle, rule=copy.deepcopy(rules[key]))
    if major in rules:
        return RuleMatch(key=major, major=major, middle=None, rule=copy.deepcopy(rules[major]))
    return None


def is_recyclable(classification: dict[str, Any] | None) -> bool:
    return classification is not None and classification.get("major_category") == "recyclable"


def situation_advice(rule: dict[str, Any] | None, tags: list[str] | tuple[str, ...]) -> list[str]:
    """Extra steps for the situation tags, rule-specific advice first choice; unknown tags ignored."""
    specific: dict[str, str] = (rule or {}).get("situation_advice") or {}
    wanted = set(tags)
    return [specific.get(tag) or SITUATION_ADVICE[tag] for tag in SITUATION_TAGS if tag in wanted]


def classification_schema() -> dict[str, Any]:
    """JSON Schema of the vision model's output (OpenAI strict json_schema compatible)."""
    return {
        "type": "object",
        "properties": {
            "major_category": {"type": "string", "enum": list(MAJOR_CATEGORIES)},
            "middle_category": {
                "type": "string",
                "enum": [*ALL_MIDDLES, UNKNOWN_MIDDLE],
                "description": "Sub-category of the major category; 'unknown' when none fits.",
            },
            "minor_category": {"type": "string", "description": "The specific item, e.g. 'water bottle'."},
            "situation_tags": {"type": "array", "items": {"type": "string", "enum": list(SITUATION_TAGS)}},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["major_category", "middle_category", "minor_category", "situation_tags", "confidence"],
        "additionalProperties": False,
    }


def answer_schema() -> dict[str, Any]:
    """JSON Schema of the answer model's output; `gaps` lists what the answer could not cover."""
    strings = {"type": "array", "items": {"type": "string"}}
    return {
        "type": "object",
        "properties": {
            "disposal_steps": strings,
            "user_answer": {"type": "string"},
            "warnings": strings,
            "gaps": {**strings, "description": "What the answer could not cover; empty when nothing."},
        },
        "required": ["disposal_steps", "user_answer", "warnings", "gaps"],
        "additionalProperties": False,
    }
