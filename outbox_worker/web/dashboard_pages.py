"""How the dashboard answers: its pages rendered from the templates, the links between them,
and the redirects that carry a one-shot flash message to the next page shown."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import Request, status
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, PackageLoader, StrictUndefined
from pydantic import BaseModel

from outbox_worker.formatting import first_line, format_duration, format_relative, format_time
from outbox_worker.jobs import JobState
from outbox_worker.web.router import NotCommitted

# The routes' names, which the templates link to.
HOME = "outbox_dashboard"
LOGIN = "outbox_dashboard_login"
LOGOUT = "outbox_dashboard_logout"
JOBS = "outbox_dashboard_jobs"
JOB = "outbox_dashboard_job"
RETRY = "outbox_dashboard_retry"
CANCEL = "outbox_dashboard_cancel"
QUEUE_PAUSE = "outbox_dashboard_queue_pause"
QUEUE_RESUME = "outbox_dashboard_queue_resume"
QUEUE = "outbox_dashboard_queue"
QUEUE_SETTINGS = "outbox_dashboard_queue_settings"

FLASH_COOKIE = "outbox_flash"
# What browsers keep of one cookie, and more than encode_flash writes: a longer value is not
# one of ours, and is not decoded.
MAX_FLASH_COOKIE = 4096
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


# --- formatting, as Jinja filters -----------------------------------------------------------
# Times and durations: outbox_worker.formatting's, which the CLI's tables use too.


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def as_typed(value: float) -> str:
    """A number of seconds as a form field shows it and reads it back: ``1``, ``0.5``, never
    ``1.0`` or ``1e-07``."""
    return format(value, ".12f").rstrip("0").rstrip(".")


templates = Environment(
    loader=PackageLoader("outbox_worker.web", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
templates.filters.update(
    duration=format_duration,
    when=format_time,
    ago=format_relative,
    pretty_json=pretty_json,
    first_line=first_line,
    as_typed=as_typed,
)


# --- links and flash messages ---------------------------------------------------------------


def link(request: Request, name: str, query: Mapping[str, Any] | None = None, **params: Any) -> str:
    """The path of one of the dashboard's routes, wherever the app mounted the router."""
    path = request.url_for(name, **params).path
    kept = {key: value for key, value in (query or {}).items() if value not in (None, "")}
    return f"{path}?{urlencode(kept)}" if kept else path


def home(request: Request) -> str:
    return link(request, HOME)


class Flash(BaseModel):
    kind: Literal["ok", "error"]
    text: str


def encode_flash(kind: str, text: str) -> str:
    raw = json.dumps({"kind": kind, "text": text[:500]}, ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_flash(value: str | None) -> Flash | None:
    """The message a flash cookie holds, or None, whatever the cookie holds: pydantic's JSON
    parser refuses what is not UTF-8 and nesting past its recursion limit."""
    if not value or len(value) > MAX_FLASH_COOKIE:
        return None
    try:
        return Flash.model_validate_json(base64.urlsafe_b64decode(value))
    except (binascii.Error, ValueError):
        return None


# --- answers --------------------------------------------------------------------------------


def render(
    request: Request,
    template: str,
    *,
    status_code: int = status.HTTP_200_OK,
    refresh: int | None = None,
    signed_in: bool = True,
    **context: Any,
) -> HTMLResponse:
    """A page, which shows (and so uses up) the flash message the request brought."""
    flash = decode_flash(request.cookies.get(FLASH_COOKIE))
    html = templates.get_template(template).render(
        url=lambda name, query=None, **params: link(request, name, query, **params),
        states=[state.value for state in JobState],
        now=datetime.now(UTC),
        refresh=refresh,
        signed_in=signed_in,
        flash=flash,
        **context,
    )
    response = HTMLResponse(html, status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    # No script, no frame, forms only to this site: the pages need nothing else.
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "same-origin"
    if FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path=home(request))
    return response


def message(
    request: Request, status_code: int, title: str, text: str, *, signed_in: bool = False
) -> HTMLResponse:
    return render(
        request,
        "message.html",
        status_code=status_code,
        signed_in=signed_in,
        title=title,
        text=text,
    )


def not_committed(request: Request, title: str, exc: NotCommitted) -> HTMLResponse:
    return message(
        request,
        status.HTTP_500_INTERNAL_SERVER_ERROR,
        title,
        f"{exc}. Nothing was changed.",
        signed_in=True,
    )


def redirect(
    request: Request, url: str, *, flash: tuple[str, str] | None = None
) -> RedirectResponse:
    """A 303 to ``url``, with a message for the next page shown (a short-lived cookie on the
    dashboard's path only)."""
    response = RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)
    if flash is not None:
        response.set_cookie(
            FLASH_COOKIE,
            encode_flash(*flash),
            max_age=60,
            path=home(request),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    return response
