"""The library's own Alembic scripts: ``env.py`` for ``outbox-worker migrate``, and
``versions/``, the ``pgoutbox`` branch an application's Alembic may carry instead
(see :mod:`outbox_worker.migrate`)."""
