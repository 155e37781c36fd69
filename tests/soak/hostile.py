"""What each hostile kind of ``soak_hostile`` must leave behind: one bad job costs only
itself, and what it gives the database is stored, altered only where it must be."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tests.soak.records import Run, Transition

HOSTILE_TASK = "soak_hostile"
# What tests.soak.tasks.UNSTORABLE must become in the database: the bad character replaced
# by U+FFFD, the rest kept. Written out here rather than computed by the worker's own code,
# so that the check cannot agree with a wrong conversion.
STORED = "before\ufffdafter"
RESULT_KINDS = ("nul_result", "surrogate_result")
# Hostile kinds that fail every attempt -> the first line every failure must store.
ERROR_KINDS = {
    "nul_error": f"ValueError: {STORED}",
    "surrogate_error": f"ValueError: {STORED}",
    "base_exception": "HandlerEscape: hostile",
    "system_exit": "SystemExit: hostile",
    "keyboard_interrupt": "KeyboardInterrupt: hostile",
    "cancels_itself": "CancelledError: hostile",
}
KNOWN_KINDS = frozenset({*RESULT_KINDS, "deep", "too_deep", *ERROR_KINDS})


def first_line(text: str | None) -> str:
    return (text or "").split("\n", 1)[0]


def check_result(j: Mapping[str, Any], what: str) -> list[str]:
    """A result the database cannot store is stored with U+FFFD in place of the bad
    character; args as deep as enqueue allows arrive whole (the handler answers how deep)."""
    kind, state = j["kind"], j["state"]
    if kind in RESULT_KINDS:
        stored = None if j["result"] is None else json.loads(j["result"])
        if state != "succeeded" or stored != {"text": STORED}:
            return [f"{what}, result {j['result']!r}"]
    elif kind == "deep" and (state != "succeeded" or j["result"] != str(j["levels"])):
        return [f"{what}, {j['levels']} levels, result {j['result']!r}"]
    return []


def check_burial(j: Mapping[str, Any], runs: Sequence[Run], what: str) -> list[str]:
    """Args deeper than any Python reader decodes: buried dead at the first claim, unrun."""
    if j["kind"] != "too_deep":
        return []
    if j["state"] != "dead" or runs or not re.search(r"\bnest", j["last_error"] or ""):
        return [
            f"{what} after {len(runs)} execution(s), {j['levels']} levels, "
            f"last error {first_line(j['last_error'])!r}"
        ]
    return []


def check_errors(j: Mapping[str, Any], trans: Sequence[Transition], what: str) -> list[str]:
    """Every attempt fails; each failure must store the real error. A fault may end the
    last attempt instead (a rescue, a release), so the final last_error is not required to
    be the handler's; at least one failure must be."""
    kind = j["kind"]
    if kind not in KNOWN_KINDS:
        return [f"{what}: a hostile kind the check does not know"]
    if kind not in ERROR_KINDS:
        return []
    failures = [t for t in trans if t.kind == "failure"]
    wrong = [t for t in failures if first_line(t.error) != ERROR_KINDS[kind]]
    if j["state"] != "dead" or not failures or wrong:
        shown = first_line((wrong or failures)[0].error)[:100] if failures else None
        return [
            f"{what} after {len(failures)} failure(s), stored {shown!r} "
            f"(expected {ERROR_KINDS[kind]!r})"
        ]
    return []
