"""The routing rules of the node: the rules file named by ``routing_rules_file``, or the
default rule set made of the chest rule (``chest_rule``).

The file is TOML (read with :mod:`tomllib`), one ``[[rules]]`` table per rule, first match
wins (:mod:`integration.routing`); ``docs/configuration.md`` ("Routing rules") is the
reference and ``deploy/routing-rules.example.toml`` an example. It is read and checked once,
when the settings are built (so ``cxr-node serve`` refuses to start on a bad file): unknown
attributes or keys, bad regular expressions, unknown destinations and duplicate names are
errors that name the setting, the rule and the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path

from integration.routing import CHEST_RULE_NAME, RuleSet, chest_conditions, chest_rule_set
from integration.routing_file import RuleError, parse_rule_set
from node.settings.values import ChestRule

__all__ = ["default_rule_set", "destination_names", "load_rule_set"]

MAX_RULES_FILE_BYTES = 1024 * 1024


def destination_names(destinations: Sequence[object]) -> dict[str, str]:
    """The names a rule may give a configured destination -> its text form (the name the
    delivery queue uses): the text form, and for a DICOM destination ``AET@host:port`` its
    AE title when no other destination has it."""
    names: dict[str, str] = {}
    titles: dict[str, list[str]] = {}
    for dest in destinations:
        text = str(dest)
        names[text] = text
        title = getattr(dest, "ae_title", None)
        if isinstance(title, str) and title:
            titles.setdefault(title, []).append(text)
    for title, texts in titles.items():
        if len(texts) == 1:
            names.setdefault(title, texts[0])
    return names


def default_rule_set(chest: ChestRule) -> RuleSet:
    """The chest rule as the only rule (``chest``): today's behaviour, the default."""
    return chest_rule_set(
        modalities=chest.modalities,
        keywords=chest.keywords,
        match_descriptions=chest.match_descriptions,
        require_keyword=chest.require_keyword,
    )


def load_rule_set(
    path: Path | None, *, chest: ChestRule, destinations: Sequence[object]
) -> RuleSet:
    """Read and check the rules file, or build the default rule set when ``path`` is None.

    Parameters
    ----------
    path
        The ``routing_rules_file`` setting.
    chest
        The ``chest_rule`` setting: the default rule set, and the ``preset = "chest"``
        conditions a rule may start from.
    destinations
        The configured destinations (the names rules may list).

    Raises
    ------
    ValueError
        Starting with ``routing_rules_file:``: the file is missing, too large, not TOML, or
        a rule is invalid (:class:`integration.routing_file.RuleError`).
    """
    if path is None:
        return default_rule_set(chest)
    where = f"routing_rules_file: {path}"
    try:
        if path.stat().st_size > MAX_RULES_FILE_BYTES:
            raise ValueError(f"{where}: larger than {MAX_RULES_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{where}: not valid TOML ({exc})") from None
    presets = {
        CHEST_RULE_NAME: chest_conditions(
            modalities=chest.modalities,
            keywords=chest.keywords,
            match_descriptions=chest.match_descriptions,
            require_keyword=chest.require_keyword,
        )
    }
    try:
        return parse_rule_set(
            data,
            source=str(path),
            presets=presets,
            destinations=destination_names(destinations),
        )
    except RuleError as exc:
        raise ValueError(f"{where}: {exc}") from None
