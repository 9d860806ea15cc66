"""The routing rules file: TOML ``[[rules]]`` tables -> a :class:`~integration.routing.RuleSet`.

Each table: ``name``; ``when``, a list of conditions (``attribute`` and one operator, see
:mod:`integration.routing`), or ``preset`` (a named list such as ``chest``) plus ``when``;
and the action ``draft``, ``model``, ``priority``, ``destinations``. Every refusal names the
rule and the key. Pure: the caller reads the file (``node.settings.routing``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from integration.priority import MAX_PRIORITY, MIN_PRIORITY
from integration.routing import ATTRIBUTES, Condition, RoutingRule, RuleSet

__all__ = ["RuleError", "parse_rule_set"]

_OPERATORS = ("equals", "one_of", "glob", "regex", "contains", "present", "age")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a rule's name


class RuleError(ValueError):
    """A rules file that cannot be used; the message says where and why."""


def _strings(value: Any, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise RuleError(f"{where}: give a string or a non-empty list of strings")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise RuleError(f"{where}: {item!r} is not a non-empty string")
        out.append(item.strip())
    return tuple(out)


def _condition(raw: Any, where: str) -> Condition:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: a condition is a table, got {type(raw).__name__}")
    data = dict(raw)
    negate = data.pop("not", False)
    if not isinstance(negate, bool):
        raise RuleError(f"{where}: 'not' must be true or false")
    if "any" in data:
        group = data.pop("any")
        if data:
            raise RuleError(f"{where}: 'any' takes no other keys (got {', '.join(sorted(data))})")
        if not isinstance(group, list) or not group:
            raise RuleError(f"{where}: 'any' must be a non-empty list of conditions")
        inner = tuple(_condition(c, f"{where}.any[{i}]") for i, c in enumerate(group))
        return Condition(None, "any", negate=negate, any=inner)
    attribute = data.pop("attribute", None)
    if attribute not in ATTRIBUTES:
        raise RuleError(
            f"{where}: unknown attribute {attribute!r}; use one of {', '.join(ATTRIBUTES)}"
        )
    if "age_min" in data or "age_max" in data:
        if attribute != "PatientAge":
            raise RuleError(f"{where}: age_min/age_max apply to PatientAge only")
        lo, hi = data.pop("age_min", None), data.pop("age_max", None)
        for key, v in (("age_min", lo), ("age_max", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
                raise RuleError(f"{where}: {key} must be a number of years >= 0")
        if lo is not None and hi is not None and hi <= lo:
            raise RuleError(f"{where}: age_max must be greater than age_min")
        if data:
            raise RuleError(f"{where}: unexpected key(s) {', '.join(sorted(data))}")
        return Condition(
            attribute,
            "age",
            age_min=None if lo is None else float(lo),
            age_max=None if hi is None else float(hi),
            negate=negate,
        )
    ops = [k for k in data if k in _OPERATORS]
    extra = sorted(set(data) - set(_OPERATORS))
    if extra:
        raise RuleError(f"{where}: unexpected key(s) {', '.join(extra)}")
    if len(ops) != 1:
        raise RuleError(
            f"{where}: give exactly one of equals, glob, regex, contains, present, "
            "age_min/age_max, any"
        )
    op, value = ops[0], data[ops[0]]
    if op == "present":
        if not isinstance(value, bool):
            raise RuleError(f"{where}: present must be true or false")
        return Condition(attribute, "present", ("true" if value else "false",), negate=negate)
    if op == "regex":
        if not isinstance(value, str) or not value:
            raise RuleError(f"{where}: regex must be a non-empty string")
        try:
            pattern = re.compile(value, re.IGNORECASE)
        except re.error as exc:
            raise RuleError(f"{where}: bad regex {value!r}: {exc}") from None
        return Condition(attribute, "regex", (value,), negate=negate, _regex=pattern)
    if op == "age":
        raise RuleError(f"{where}: use age_min and/or age_max")
    values = tuple(v.upper() for v in _strings(value, f"{where}.{op}"))
    return Condition(attribute, "equals" if op == "one_of" else op, values, negate=negate)


def _rule(raw: Any, where: str, presets: Mapping[str, tuple[Condition, ...]]) -> RoutingRule:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: a rule is a table")
    data = dict(raw)
    name = data.pop("name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise RuleError(f"{where}: name must be 1-64 letters, digits or _.- (got {name!r})")
    where = f"rule {name!r}"
    conds: list[Condition] = []
    preset = data.pop("preset", None)
    if preset is not None:
        if preset not in presets:
            raise RuleError(f"{where}: unknown preset {preset!r}; use {', '.join(presets)}")
        conds.extend(presets[preset])
    when = data.pop("when", [])
    if isinstance(when, Mapping):
        when = [when]
    if not isinstance(when, list):
        raise RuleError(f"{where}: 'when' must be a list of conditions")
    conds += [_condition(c, f"{where}.when[{i}]") for i, c in enumerate(when)]
    draft = data.pop("draft", True)
    if not isinstance(draft, bool):
        raise RuleError(f"{where}: draft must be true or false")
    model = data.pop("model", None)
    if model is not None and (not isinstance(model, str) or not 0 < len(model.strip()) <= 128):
        raise RuleError(f"{where}: model must be a model name (1-128 characters)")
    priority = data.pop("priority", None)
    if priority is not None and (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not MIN_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise RuleError(f"{where}: priority must be an integer in {MIN_PRIORITY}..{MAX_PRIORITY}")
    dests = data.pop("destinations", None)
    destinations: tuple[str, ...] | None = None
    if dests is not None:
        if not isinstance(dests, list) or not all(isinstance(d, str) and d for d in dests):
            raise RuleError(f"{where}: destinations must be a list of destination names")
        destinations = tuple(d.strip() for d in dests)
    if data:
        raise RuleError(f"{where}: unexpected key(s) {', '.join(sorted(data))}")
    if not draft and (model is not None or priority is not None or destinations is not None):
        raise RuleError(
            f"{where}: a rule with draft = false takes no model, priority or destinations"
        )
    return RoutingRule(
        name=name,
        conditions=tuple(conds),
        draft=draft,
        model=model.strip() if model else None,
        priority=priority,
        destinations=destinations,
    )


def parse_rule_set(
    data: Mapping[str, Any],
    *,
    source: str = "rules file",
    presets: Mapping[str, tuple[Condition, ...]] | None = None,
    destinations: Mapping[str, str] | None = None,
) -> RuleSet:
    """Build a :class:`RuleSet` from a rules file's data (``[[rules]]`` tables).

    Parameters
    ----------
    data
        The parsed file: ``{"rules": [{"name": ..., "when": [...], ...}, ...]}``.
    source
        Where the rules came from (shown with them).
    presets
        Named condition lists a rule may start from with ``preset = "<name>"`` (the node
        passes ``chest``: :func:`chest_conditions` of its ``chest_rule``).
    destinations
        The names a rule may list for a destination -> its canonical name (the text form
        the delivery queue uses); ``None``: not checked here.

    Raises
    ------
    RuleError
        Naming the rule and the key: an unknown attribute or key, a bad regex, an unknown
        destination, a duplicate rule name, no rules.
    """
    extra = sorted(set(data) - {"rules"})
    if extra:
        raise RuleError(f"unexpected top-level key(s) {', '.join(extra)}; use [[rules]]")
    raw = data.get("rules")
    if not isinstance(raw, list) or not raw:
        raise RuleError("no rules: add at least one [[rules]] table")
    rules = [_rule(r, f"rules[{i}]", presets or {}) for i, r in enumerate(raw)]
    seen: set[str] = set()
    for r in rules:
        if r.name in seen:
            raise RuleError(f"rule {r.name!r} is defined twice")
        seen.add(r.name)
    if destinations is not None:
        known = sorted(set(destinations.values()))
        for i, r in enumerate(rules):
            if r.destinations is None:
                continue
            unknown = [d for d in r.destinations if d not in destinations]
            if unknown:
                raise RuleError(
                    f"rule {r.name!r}: destination {unknown[0]!r} is not configured "
                    f"(configured: {', '.join(known) or 'none'})"
                )
            canonical = tuple(dict.fromkeys(destinations[d] for d in r.destinations))
            rules[i] = replace(r, destinations=canonical)
    return RuleSet(tuple(rules), source=source)
