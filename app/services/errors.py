"""Domain errors the routes turn into 4xx answers."""

from __future__ import annotations


class DomainError(Exception):
    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class EmailTaken(DomainError):
    status_code = 409


class IdempotencyKeyReused(DomainError):
    status_code = 422


class NotFound(DomainError):
    status_code = 404
