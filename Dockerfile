# One image for the API (default), the worker and migrations:
#   docker run IMAGE                                        → uvicorn app.main:app
#   docker run IMAGE outbox-worker run app.tasks:registry   → a worker
#   docker run IMAGE alembic upgrade heads                  → migrations (the sample's and pgoutbox's)
# Not exercised by CI (no Docker engine there); see README.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY outbox_worker ./outbox_worker
COPY app ./app
# The library with its web and uvloop extras, then the sample service's own dependencies
# (a dependency group of this repository, not an extra of the library); --group needs pip 25.1.
RUN /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install ".[web,uvloop]" --group sample

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --home-dir /srv pgoutbox
WORKDIR /srv
COPY --from=build /opt/venv /opt/venv
COPY --chown=pgoutbox alembic.ini ./
COPY --chown=pgoutbox alembic ./alembic
COPY --chown=pgoutbox app ./app
USER pgoutbox
EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
