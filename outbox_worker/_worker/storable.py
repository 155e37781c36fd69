"""What a handler hands back, in a form PostgreSQL will store.

A worker writes two things that come from user code: the handler's result (``jsonb``) and
its error (``last_error``, ``text``). PostgreSQL refuses a NUL character in either, and the
driver cannot even encode a lone surrogate. One such value used to fail the whole batch of
outcomes it was written with, so every other job of that batch ran again. Here both become
storable before they reach SQL: each offending character turns into U+FFFD, the Unicode
replacement character, and the caller is told, so it can log that the value was altered.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from outbox_worker.formatting import error_line

REPLACEMENT = "\ufffd"
# A lone surrogate, as Python holds it: with ensure_ascii=False, json.dumps writes a valid
# astral character as one code point, so any surrogate code point left is unpaired.
_SURROGATE = re.compile("[\ud800-\udfff]")
# NUL as json.dumps escapes it, preceded by an even number of backslashes (so that a
# literal backslash followed by "u0000" is left alone).
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")

_ENCODER = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def storable_text(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    if not text.isascii():
        text = _SURROGATE.sub(REPLACEMENT, text)
    return text


@dataclass(frozen=True, slots=True)
class EncodedResult:
    """A result as JSON text (None: nothing to store), and why it is not exactly what the
    handler returned, if it is not."""

    json: str | None
    problem: str | None = None


def encode_result(value: Any) -> EncodedResult:
    """The handler's return value as JSON text jsonb accepts.

    None stays None; a value with no JSON form (a set, NaN, nesting too deep to encode) is
    stored as NULL; text jsonb would refuse has its NUL and lone surrogates replaced.
    """
    if value is None:
        return EncodedResult(None)
    try:
        encoded = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        return EncodedResult(None, f"not stored: no JSON form ({error_line(exc)})")
    altered = False
    if "\\u0000" in encoded:
        fixed = _NUL_ESCAPE.sub(r"\1\\ufffd", encoded)
        altered = fixed != encoded
        encoded = fixed
    if not encoded.isascii() and _SURROGATE.search(encoded):
        encoded = _SURROGATE.sub(REPLACEMENT, encoded)
        altered = True
    if altered:
        return EncodedResult(
            encoded, "altered: NUL or unpaired surrogate characters replaced by U+FFFD"
        )
    return EncodedResult(encoded)
