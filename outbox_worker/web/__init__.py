"""FastAPI faces of the admin service: JSON routes and a dashboard, for any FastAPI app.

    from outbox_worker.web import create_admin_router
    app.include_router(create_admin_router(get_session=..., admin_token=...))

Needs the ``app`` extra (fastapi, jinja2).
"""

from outbox_worker.web.router import create_admin_router

__all__ = ["create_admin_router"]
