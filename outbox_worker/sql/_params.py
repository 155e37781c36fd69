"""How statements name, declare and bind their parameters.

Every statement is written with ``:name`` placeholders. App-side statements (``client``,
``admin``) keep that form: the names in the text are their whole declaration, and
outbox_worker.drivers renders them per driver (SQLAlchemy reads them as they are;
:func:`positional` and :func:`parameter_names` on a raw asyncpg connection; :func:`pyformat`
on psycopg).

Worker-side statements (``worker``) run on asyncpg, prepared and cached per connection. Each
declares its names in the order asyncpg takes them (:func:`statement`), rendered into ``$n``
text once, at import. That text is a plain ``str``, because asyncpg refuses a str subclass as
a query and keys its statement cache on the text, so the declaration is kept beside it, looked
up by that text: :func:`bind` turns a call's arguments by name into asyncpg's order, and
:func:`declared` lists every declaration for tests/test_sql.py to check against the server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

# ``:name``, but not the ``::type`` of a cast (nor the second colon of one).
_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)\b")

# A worker-side statement's ``$n`` text -> its parameter names, ``$1`` first.
_DECLARED: dict[str, tuple[str, ...]] = {}


def _numbered(statement: str, names: tuple[str, ...]) -> str:
    """``statement`` with each ``:name`` replaced by ``$n``, n its place in ``names``."""
    numbers = {name: f"${number}" for number, name in enumerate(names, start=1)}

    def number(found: re.Match[str]) -> str:
        try:
            return numbers[found[1]]
        except KeyError:
            raise ValueError(f"parameter :{found[1]} is used but not declared") from None

    return _NAMED.sub(number, statement)


def parameter_names(statement: str) -> tuple[str, ...]:
    """The ``:name`` parameters of a statement, in the order they first appear: the order
    :func:`positional` numbers them in for enqueue on a raw asyncpg connection."""
    return tuple(dict.fromkeys(_NAMED.findall(statement)))


def positional(statement: str, *names: str) -> str:
    """An app-side statement in asyncpg's form: ``:name`` becomes ``$n`` in the order given.

    For drivers.py, which numbers an app-side statement by :func:`parameter_names`; a
    statement the worker runs is declared with :func:`statement` instead, and bound by name.
    """
    try:
        return _numbered(statement, names)
    except ValueError:
        raise ValueError("a :name parameter was left unnumbered") from None


def pyformat(statement: str) -> str:
    """An app-side statement in psycopg's form, for enqueue on a raw psycopg connection:
    ``:name`` becomes ``%(name)s`` and a literal ``%`` is doubled."""
    return _NAMED.sub(r"%(\1)s", statement.replace("%", "%%"))


def statement(text: str, *, params: tuple[str, ...] = ()) -> str:
    """A worker-side statement: ``text``, whose ``:name`` placeholders are exactly the names
    ``params`` declares, rendered into asyncpg's ``$n`` form numbered in that order.

    Called at import, so a placeholder left undeclared, or a name declared and never used,
    fails the import rather than a call.
    """
    if len(set(params)) != len(params):
        raise ValueError(f"a parameter is declared twice: {params}")
    unused = set(params) - set(_NAMED.findall(text))
    if unused:
        raise ValueError(f"declared but never used: {sorted(unused)}")
    rendered = _numbered(text, params)
    if _DECLARED.setdefault(rendered, params) != params:
        raise ValueError(f"the same statement is declared twice, with other names:\n{rendered}")
    return rendered


def bind(statement: str, /, **values: Any) -> tuple[Any, ...]:
    """``statement`` and its arguments in the order it declared them, bound by name: spread
    it into asyncpg, ``conn.fetch(*sql.bind(sql.JOB_CLAIM, queues=…, limit=…, …))``.

    Every declared name must be given, and no other: a misnamed or forgotten argument is a
    TypeError here, not a value bound to the wrong placeholder.
    """
    names = _DECLARED.get(statement)
    if names is None:
        raise ValueError(f"not a statement declared with sql.statement():\n{statement}")
    if len(values) != len(names) or not all(name in values for name in names):
        raise TypeError(f"the statement takes {', '.join(names)}; given {', '.join(values)}")
    return (statement, *[values[name] for name in names])


def declared() -> Mapping[str, tuple[str, ...]]:
    """Every worker-side statement (its ``$n`` text) and its parameter names, ``$1`` first."""
    return MappingProxyType(_DECLARED)
