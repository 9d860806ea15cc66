"""The configuration reference and the example file say what the settings and commands are.

``docs/configuration.md`` is the reference: one table row per setting, with its environment
variable and its default, and a "Commands" section that names every ``cxr-node`` command with
its options. ``deploy/cxr-node.example.toml`` calls itself "an example with every setting":
each setting is set there or shown commented out, and every commented-out line, once
uncommented, loads with the node's own loader (``load_settings``), so a commented value an
admin copies is one the node takes.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main

from node.cli.main import app
from node.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "deploy" / "cxr-node.example.toml"

#: a setting's row: | `name` | `CXR_NODE_NAME` | default | validation |
_ROW = re.compile(r"^\| `([a-z_0-9]+)` \| `([A-Z_0-9]+)`[^|]* \| ([^|]*) \|", re.M)
#: settings documented by their parts' rows (``chest_rule.modalities`` ...), not one row
_TABLES = {"chest_rule"}
#: defaults the reference writes in words: nothing set, or an empty list
_NOTHING = re.compile(r"^(unset|empty|none)\b")
#: a commented-out assignment, table header or inline table of the example
_COMMENTED = re.compile(r"^(\s*)#\s?((?:[a-z_][a-z0-9_]*\s*=|\[\[?[a-z_]+\]\]?|\{).*)$")
#: commented lines left commented when the example is loaded whole, and why
_KEPT_COMMENTED = {
    # its path is /etc/cxr-node/...; deploy/routing-rules.example.toml has destinations of
    # its own and is loaded by tests/node/test_routing_table.py
    "routing_rules_file",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


def _reference_rows() -> dict[str, tuple[str, str]]:
    rows = _ROW.findall(REFERENCE.read_text(encoding="utf-8"))
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)), "a setting has two rows in the reference"
    return {name: (variable, default.strip()) for name, variable, default in rows}


def _documented_default(text: str) -> Any:
    """The value a ``Default`` cell names: a TOML literal in backticks, a comma-separated
    list in backticks, or a word for nothing set."""
    if _NOTHING.match(text):
        return None
    literal = re.match(r"^`([^`]*)`", text)
    assert literal, f"default {text!r}: neither a literal in backticks nor unset/empty/none"
    raw = literal.group(1)
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw if "," not in raw else sorted(p.strip() for p in raw.split(","))


def test_every_setting_has_one_row_with_its_variable() -> None:
    rows = _reference_rows()
    fields = set(Settings.model_fields)
    assert set(rows) == fields - _TABLES, "rows without a setting, or settings without a row"
    for name, (variable, _) in rows.items():
        assert variable == f"{ENV_PREFIX}{name.upper()}", name
    text = REFERENCE.read_text(encoding="utf-8")
    for table in _TABLES:
        assert f"| `{table}." in text, f"{table}: no rows for its parts"


def test_reference_defaults_are_the_settings_defaults() -> None:
    for name, (_, cell) in _reference_rows().items():
        default = Settings.model_fields[name].get_default(call_default_factory=True)
        documented = _documented_default(cell)
        if isinstance(default, Path):
            default = str(default)
        if documented is None:
            assert default in (None, [], ""), f"{name}: documented unset, default {default!r}"
        elif isinstance(documented, list):
            assert sorted(default) == documented, name
        else:
            assert default == documented, f"{name}: documented {documented!r}, default {default!r}"
            assert isinstance(default, bool) == isinstance(documented, bool), name


_HEADER = re.compile(r"^(#\s?)?\[\[?([a-z_][a-z0-9_]*)\]\]?\s*$")
_KEY = re.compile(r"^(#\s?)?([a-z_][a-z0-9_]*)\s*=")


def _example_keys() -> tuple[set[str], set[str]]:
    """Top-level keys and tables the example sets, and those it shows commented out. The
    example puts its top-level keys first: the keys after the first table are the table's."""
    active: set[str] = set()
    commented: set[str] = set()
    in_tables = False
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        header = _HEADER.match(line)
        key = None if in_tables or header else _KEY.match(line)
        found = header or key
        if found:
            (commented if found.group(1) else active).add(found.group(2))
        in_tables = in_tables or header is not None
    return active, commented


def test_example_names_every_setting() -> None:
    active, commented = _example_keys()
    fields = set(Settings.model_fields)
    missing = fields - active - commented
    assert not missing, f"settings the example does not show: {sorted(missing)}"
    assert active | commented <= fields, f"not settings: {sorted(active | commented - fields)}"


def test_example_loads_with_its_commented_lines(tmp_path: Path) -> None:
    active, _ = _example_keys()
    lines = []
    uncommented: set[str] = set()
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        m = _COMMENTED.match(line)
        named = m and (_HEADER.match(m.group(2)) or _KEY.match(m.group(2)))
        key = named.group(2) if named else ""  # "": an inline table of an array
        if m and key not in active and key not in _KEPT_COMMENTED:
            lines.append(m.group(1) + m.group(2))
            uncommented.add(key)
        else:
            lines.append(line)
    whole = tmp_path / "cxr-node.toml"
    whole.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = load_settings(whole)  # refuses unknown keys and values out of bounds
    assert {"remote_urls", "hl7_listen", "tls_cert_file", "priority_rules"} <= uncommented
    assert settings.remote_urls and settings.hl7_listen and settings.priority_rules
    assert len(settings.destinations) == 5, "the text form and the four commented tables"


#: command groups whose options the reference leaves to ``--help`` and to the guide it names
_OPTIONS_ELSEWHERE = {
    "models": "cxr-node models COMMAND --help, docs/cpu-engine.md",
    "train": "docs/training.md",
    "evaluate": "docs/evaluation.md",
}
#: options every command has, described once at the top of the section
_COMMON_OPTIONS = {"--config", "--help"}


def _commands() -> dict[str, set[str]]:
    """Every ``cxr-node`` command path (``"jobs list"``) and its option names (typer may
    vendor its click: groups are told by their ``commands``)."""
    found: dict[str, set[str]] = {}

    def walk(command: Any, path: list[str]) -> None:
        subcommands = getattr(command, "commands", None)
        if isinstance(subcommands, dict):
            for name, sub in subcommands.items():
                walk(sub, [*path, name])
            return
        names: set[str] = set()
        for param in command.params:
            names.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        found[" ".join(path)] = names - _COMMON_OPTIONS

    walk(typer.main.get_command(app), [])
    return found


def _command_spans() -> list[str]:
    text = REFERENCE.read_text(encoding="utf-8")
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"`(cxr-node [^`]+)`", section.replace("\n  ", " "))


def test_every_command_is_in_the_reference_with_its_options() -> None:
    spans = _command_spans()
    for path, options in _commands().items():
        own = [s for s in spans if re.match(rf"cxr-node {re.escape(path)}(\s|$)", s)]
        group, _, leaf = path.rpartition(" ")
        listed = [  # "cxr-node models create-demo | import-llmcxr | ..."
            s
            for s in spans
            if group
            and s.startswith(f"cxr-node {group} ")
            and leaf in re.split(r"\s*\|\s*", s[len(f"cxr-node {group} ") :])
        ]
        assert own or listed, f"cxr-node {path}: not in docs/configuration.md, Commands"
        if path.split()[0] in _OPTIONS_ELSEWHERE or not own:
            continue
        named = set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(own)))
        # a flag pair (--worker/--no-worker) is named by either of its forms
        missing = {o for o in options if o not in named and f"--no-{o[2:]}" not in named}
        missing -= {o for o in options if o.startswith("--no-") and f"--{o[5:]}" in named}
        assert not missing, f"cxr-node {path}: options not in the reference: {sorted(missing)}"
