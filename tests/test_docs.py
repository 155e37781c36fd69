"""The documentation against the code.

docs/configuration.md's tables list exactly the variables the code reads: the library's
``WorkerSettings``, the flags of ``outbox-worker`` that read the environment, the sample
service's ``Settings`` and the tests' server URL. And every relative link in the Markdown
files points to a file that exists.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import typer.main
from pydantic import AliasChoices, AliasPath
from pydantic_settings import BaseSettings

from app.core.config import Settings
from outbox_worker.cli import app as cli_app
from outbox_worker.config import WorkerSettings
from outbox_worker.devdb import start_postgres
from tests.conftest import ROOT

CONFIGURATION = ROOT / "docs" / "configuration.md"
MARKDOWN = sorted(
    [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "bench" / "README.md",
        *ROOT.glob("docs/*.md"),
    ]
)

LIBRARY = "## The library"
FLAGS = "### Flags read from the environment"
SAMPLE = "## The sample service"
TESTS = "## The tests"

# An inline link or image, [text](target); the target ends at a space (a title) or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def table_variables(text: str, heading: str) -> list[str]:
    """The variables named in the first column of the first table under ``heading``."""
    lines = text.splitlines()
    assert heading in lines, f"{CONFIGURATION.name} has no heading {heading!r}"
    names: list[str] = []
    in_table = False
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            in_table = True
            first_cell = line.split("|")[1]
            names += re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell)
        elif in_table:
            break
    assert names, f"no table of variables under {heading!r}"
    return names


def environment_names(settings: type[BaseSettings]) -> dict[str, set[str]]:
    """Each field's environment variables: its validation alias's names, else prefix + name."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names: dict[str, set[str]] = {}
    for name, field in settings.model_fields.items():
        alias = field.validation_alias or field.alias
        if isinstance(alias, AliasChoices):
            choices = {c for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            choices = {alias}
        else:
            assert not isinstance(alias, AliasPath), f"{name}: a path alias is not a variable"
            choices = {prefix + name}
        # pydantic-settings reads the environment without regard to case.
        names[name] = {choice.upper() for choice in choices}
    return names


def check_against(documented: list[str], settings: type[BaseSettings]) -> None:
    fields = environment_names(settings)
    undocumented = sorted(
        f"{name} ({' or '.join(sorted(env))})"
        for name, env in fields.items()
        if not env & set(documented)
    )
    known = set().union(*fields.values())
    unknown = sorted(set(documented) - known)
    twice = sorted({name for name in documented if documented.count(name) > 1})
    assert not undocumented, f"{settings.__name__} fields missing from the table: {undocumented}"
    assert not unknown, f"documented, but no field of {settings.__name__}: {unknown}"
    assert not twice, f"documented twice: {twice}"


@pytest.fixture(scope="module")
def configuration() -> str:
    return CONFIGURATION.read_text()


def test_the_library_table_lists_every_worker_setting_and_nothing_else(
    configuration: str,
) -> None:
    check_against(table_variables(configuration, LIBRARY), WorkerSettings)


def test_the_sample_table_lists_every_sample_setting_and_nothing_else(configuration: str) -> None:
    check_against(table_variables(configuration, SAMPLE), Settings)


def _commands(command: Any) -> list[Any]:
    """The command and every command under it (typer's groups hold theirs in ``commands``)."""
    subcommands = getattr(command, "commands", {}).values()
    return [command, *(found for sub in subcommands for found in _commands(sub))]


def test_the_flags_table_lists_every_flag_read_from_the_environment(configuration: str) -> None:
    envvars: set[str] = set()
    for command in _commands(typer.main.get_command(cli_app)):
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                envvars.add(envvar)
            elif envvar:
                envvars.update(envvar)
    assert envvars, "the CLI reads no variable: is the command tree walked?"
    assert sorted(table_variables(configuration, FLAGS)) == sorted(envvars)


def test_the_tests_table_names_the_test_servers_variable(configuration: str) -> None:
    url_env = inspect.signature(start_postgres).parameters["url_env"].default
    assert table_variables(configuration, TESTS) == [url_env]


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor does inline code
    return [
        target
        for target in LINK.findall(text)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")
    ]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(path: Path) -> None:
    broken = [
        target
        for target in relative_links(path)
        if not (path.parent / unquote(target.split("#", 1)[0])).exists()
    ]
    assert not broken, f"{path.relative_to(ROOT)} links to what does not exist: {broken}"


def test_the_readme_links_to_every_document() -> None:
    linked = {
        (ROOT / target.split("#", 1)[0]).resolve() for target in relative_links(ROOT / "README.md")
    }
    missing = sorted(
        str(doc.relative_to(ROOT))
        for doc in [ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")]
        if doc.resolve() not in linked
    )
    assert not missing, f"README.md does not link to {missing}"


def test_the_readme_stays_a_front_door() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 10_000
