"""Reward characters and the grant decision of the reward stage (no model call).

A character is granted only for a recyclable item whose rules matched and whose answer had no
gaps: the reward should follow a complete, rule-backed disposal answer, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catalog.rules import RECYCLABLE_MIDDLES, is_recyclable
from contract.events import Reward


@dataclass(frozen=True)
class Character:
    code: str
    name: str
    middle_category: str | None  # None for the default mascot
    description: str


DEFAULT_CHARACTER = Character(
    "char_eco", "Eco", None, "The Eco² mascot, for recyclables that fit no single material."
)

CHARACTERS: dict[str, Character] = {
    c.code: c
    for c in (
        Character("char_paper", "Pagey", "paper", "A folded-paper sprite who loves flat, dry boxes."),
        Character("char_paper_pack", "Milky", "paper_pack", "A rinsed carton, never mixed with newspapers."),
        Character("char_pet", "Petty", "clear_pet", "A crystal-clear bottle: label off, crushed, cap on."),
        Character("char_plastic", "Plasto", "plastic", "A sturdy container who always comes back clean."),
        Character("char_vinyl", "Vinny", "vinyl", "A crinkly wrapper who gathers every last scrap."),
        Character("char_styrofoam", "Foamy", "styrofoam", "A light white box who hates leftover tape."),
        Character("char_glass", "Glassy", "glass_bottle", "A bottle who stays in one piece."),
        Character("char_metal", "Canny", "metal", "A shiny can who crushes down small."),
        Character("char_textile", "Threadie", "textile", "A patchwork friend who pairs every shoe."),
        Character("char_battery", "Volty", "battery", "A tiny battery with taped terminals."),
        Character("char_lighting", "Lumi", "lighting", "A lamp who glows all the way to the lamp box."),
        Character("char_electronics", "Chipper", "electronics", "A retired gadget waiting for free pickup."),
        DEFAULT_CHARACTER,
    )
}

_BY_MIDDLE: dict[str, Character] = {c.middle_category: c for c in CHARACTERS.values() if c.middle_category}
if set(_BY_MIDDLE) != set(RECYCLABLE_MIDDLES) or len(_BY_MIDDLE) != len(CHARACTERS) - 1:
    raise RuntimeError("there must be exactly one character per recyclable middle category")


def character_for(middle_category: str | None) -> Character:
    """The character of a recyclable middle category; the default mascot for any other value."""
    return _BY_MIDDLE.get(middle_category or "", DEFAULT_CHARACTER)


def answer_gaps(answer: dict[str, Any] | None) -> list[str]:
    """The non-blank gaps of an answer; a missing answer or malformed `gaps` counts as a gap."""
    if answer is None:
        return ["no answer"]
    gaps = answer.get("gaps")
    if not isinstance(gaps, list):
        return ["answer has no gaps list"]
    return [str(g) for g in gaps if str(g).strip()]


def decide(
    classification: dict[str, Any] | None, rule_matched: bool, answer: dict[str, Any] | None
) -> Reward:
    """Grant the middle category's character (default mascot if none) when every condition holds."""
    if not is_recyclable(classification):
        return Reward(granted=False, reason="not_recyclable")
    if not rule_matched:
        return Reward(granted=False, reason="no_rule")
    if answer_gaps(answer):
        return Reward(granted=False, reason="answer_has_gaps")
    assert classification is not None  # is_recyclable checked it
    character = character_for(classification.get("middle_category"))
    return Reward(
        granted=True, character_code=character.code, character_name=character.name, reason="granted"
    )
