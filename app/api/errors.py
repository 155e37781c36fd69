"""The 422 for a request that fails validation: where (``loc``) and what (``msg``) for a few
errors, never the input itself.

FastAPI's default answer echoes each error's ``input``: an unpaired surrogate in the body then
cannot be encoded (the 422 turns into a 500), and a big body comes back whole, once per error.
Here the answer is bounded and always encodable: at most ``MAX_ERRORS`` errors, and every
string the client made (unknown keys, pieces quoted in messages) cut to ``MAX_TEXT``
characters with unpaired surrogates escaped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

MAX_ERRORS = 10
MAX_TEXT = 200


def safe_text(value: object) -> str:
    text = str(value)
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 1] + "…"
    return text.encode("utf-8", "backslashreplace").decode()


def public_error(error: Mapping[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "type": error["type"],
        "loc": [part if isinstance(part, int) else safe_text(part) for part in error["loc"]],
        "msg": safe_text(error["msg"]),
    }
    # The context says what was expected (a JSON parser's complaint, a length): useful, and
    # of the same bounded kind once its values are text.
    if error.get("ctx"):
        shown["ctx"] = {
            key: value if isinstance(value, int) else safe_text(value)
            for key, value in error["ctx"].items()
        }
    return shown


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    detail = [public_error(error) for error in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        detail.append(
            {
                "type": "too_many_errors",
                "loc": [],
                "msg": f"{len(errors) - MAX_ERRORS} more errors not shown",
            }
        )
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)
