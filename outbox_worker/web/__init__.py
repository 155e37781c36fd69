"""FastAPI faces of the admin service: JSON routes and a dashboard, for any FastAPI app.

    from outbox_worker.web import create_admin_router, handle_database_outages
    app.include_router(create_admin_router(get_session=..., admin_token=...))
    handle_database_outages(app)  # 503 + Retry-After on every route when the database is down

Needs the ``app`` extra (fastapi, jinja2).
"""

from outbox_worker.web.router import create_admin_router, handle_database_outages

__all__ = ["create_admin_router", "handle_database_outages"]
