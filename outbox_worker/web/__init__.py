"""FastAPI faces of pgoutbox for any FastAPI app: the admin JSON routes and dashboard, a 503
for database outages, and the request id that becomes each job's correlation id.

    from outbox_worker.web import (
        RequestIdMiddleware, create_admin_router, handle_database_outages,
    )
    app.add_middleware(RequestIdMiddleware)  # X-Request-ID → each enqueued job's correlation_id
    app.include_router(create_admin_router(get_session=..., admin_token=...))
    handle_database_outages(app)  # 503 + Retry-After on every route when the database is down

Needs the ``web`` extra (``pip install 'pgoutbox[web]'``).
"""

from outbox_worker.web.correlation import REQUEST_ID_HEADER, RequestIdMiddleware
from outbox_worker.web.router import create_admin_router, handle_database_outages

__all__ = [
    "REQUEST_ID_HEADER",
    "RequestIdMiddleware",
    "create_admin_router",
    "handle_database_outages",
]
