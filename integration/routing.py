"""Routing rules: which studies are drafted, by which model, how urgently, sent where.

A site describes its routing as an ordered list of :class:`RoutingRule`; a
:class:`RuleSet` evaluates them **first match wins** over the facts of a study's series
(one mapping per series, the study-level attributes repeated in each). A rule matches a
study when one of its series satisfies every condition of the rule. The matching rule's
action decides: ``draft`` (queue a job, or skip the study), ``model`` (the model that must
draft it), ``priority`` (the job priority it gets at least) and ``destinations`` (where the
draft goes; ``None``: every configured destination). No rule matching skips the study.

What a condition may look at (:data:`ATTRIBUTES`), with the module of PS3.3 that defines it:

- Modality (0008,0060), Series Description (0008,103E), Body Part Examined (0018,0015):
  General Series (C.7.3.1);
- Study Description (0008,1030): General Study (C.7.2.1);
- Station Name (0008,1010), Institution Name (0008,0080), Institutional Department Name
  (0008,1040), Manufacturer (0008,0070): General Equipment (C.7.5.1);
- View Position (0018,5101): DX Positioning (C.8.11.5) / CR Series (C.8.1.1);
- Patient's Sex (0010,0040): Patient (C.7.1.1); the patient's age in years from Patient's
  Age (0010,1010), Patient Study (C.7.2.2), or computed from Patient's Birth Date
  (0010,0030) and Study Date (0008,0020);
- CallingAETitle: the sending association's Calling AE Title (PS3.8 A-ASSOCIATE-RQ).

Operators (exactly one per condition): ``equals`` (one value or a list: one of them,
case-insensitive), ``glob`` (shell patterns ``*``/``?``, case-insensitive), ``regex``
(Python regular expression searched, case-insensitive), ``contains`` (keywords, any as a
case-insensitive substring), ``present`` (true/false), ``age_min``/``age_max`` (years, on
``PatientAge``: ``age_min <= age < age_max``), ``any`` (a list of conditions, one must
hold); ``not = true`` negates a condition.

Explanations say why each rule matched or not without quoting free text that may hold
patient data: only coded values (Modality, Body Part Examined, View Position) and the
calling AE title are quoted, and only when they look like codes; every other attribute is
named, never quoted, and the patient's age is never shown. This module is pure: no node
imports, no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

__all__ = [
    "ATTRIBUTES",
    "CHEST_RULE_NAME",
    "HEADER_ATTRIBUTES",
    "Condition",
    "Facts",
    "RoutingDecision",
    "RoutingRule",
    "RuleResult",
    "RuleSet",
    "chest_conditions",
    "chest_rule_set",
    "patient_age_years",
]

#: attribute -> (tag, whether its value may be quoted in an explanation)
ATTRIBUTES: Mapping[str, tuple[str, bool]] = {
    "Modality": ("(0008,0060)", True),
    "BodyPartExamined": ("(0018,0015)", True),
    "ViewPosition": ("(0018,5101)", True),
    "SeriesDescription": ("(0008,103E)", False),
    "StudyDescription": ("(0008,1030)", False),
    "StationName": ("(0008,1010)", False),
    "InstitutionName": ("(0008,0080)", False),
    "InstitutionalDepartmentName": ("(0008,1040)", False),
    "Manufacturer": ("(0008,0070)", False),
    "PatientSex": ("(0010,0040)", False),
    "PatientAge": ("(0010,1010)", False),
    "CallingAETitle": ("A-ASSOCIATE-RQ", True),
}
#: attributes a node reads from an instance's header (not recorded in its database);
#: ``PatientBirthDate`` and ``StudyDate`` are read for the computed age
HEADER_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "StationName",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "Manufacturer",
        "PatientSex",
        "PatientAge",
    }
)
CHEST_RULE_NAME = "chest"

_QUOTABLE = re.compile(r"^[A-Za-z0-9 _.-]{1,16}$")
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_MAX_SERIES_EXPLAINED = 6

#: one series' facts: attribute keyword -> text, several texts, or ``None`` when absent
Facts = Mapping[str, str | Sequence[str] | None]


def _values(facts: Facts, attribute: str) -> tuple[str, ...]:
    raw = facts.get(attribute)
    if raw is None:
        return ()
    items = [raw] if isinstance(raw, str) else list(raw)
    return tuple(s for s in (str(v).strip() for v in items) if s)


def _quote(attribute: str, values: Sequence[str]) -> str:
    """``Modality CT`` for codes that may be quoted, else just the attribute's name."""
    quotable = ATTRIBUTES.get(attribute, ("", False))[1]
    if quotable and values and all(_QUOTABLE.match(v) for v in values):
        return f"{attribute} {', '.join(sorted({v.upper() for v in values}))}"
    return attribute


def patient_age_years(facts: Facts) -> float | None:
    """The patient's age in years, or ``None`` when unknown.

    From Patient's Age (0010,1010) (VR AS: ``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``), else
    from Patient's Birth Date (0010,0030) and Study Date (0008,0020) (VR DA ``YYYYMMDD``).
    """
    for text in _values(facts, "PatientAge")[:1]:
        m = _AGE.match(text.upper())
        if m:
            n, unit = int(m.group(1)), m.group(2)
            return {"D": n / 365.25, "W": n * 7 / 365.25, "M": n / 12, "Y": float(n)}[unit]
    birth = _date(_values(facts, "PatientBirthDate"))
    study = _date(_values(facts, "StudyDate"))
    if birth is None or study is None or study < birth:
        return None
    return (study - birth).days / 365.25


def _date(values: Sequence[str]) -> date | None:
    m = _DA.match(values[0]) if values else None
    if m is None:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Condition:
    """One test on a series' facts.

    Parameters
    ----------
    attribute
        One of :data:`ATTRIBUTES` (``None`` for an ``any`` group).
    op
        ``equals``, ``glob``, ``regex``, ``contains``, ``present``, ``age`` or ``any``.
    values
        The values (``equals``, ``glob``, ``contains``: upper-cased), or the pattern
        (``regex``), or ``"true"``/``"false"`` (``present``).
    age_min, age_max
        Years, for ``age``: ``age_min <= age < age_max`` (either may be ``None``).
    negate
        The condition holds when the test does not.
    any
        For ``any``: the conditions of which one must hold.
    """

    attribute: str | None
    op: str
    values: tuple[str, ...] = ()
    age_min: float | None = None
    age_max: float | None = None
    negate: bool = False
    any: tuple[Condition, ...] = ()
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @property
    def attributes(self) -> frozenset[str]:
        """The attributes this condition reads."""
        if self.op == "any":
            return frozenset().union(*(c.attributes for c in self.any))
        if self.op == "age":
            return frozenset({"PatientAge", "PatientBirthDate", "StudyDate"})
        return frozenset({self.attribute or ""})

    def test(self, facts: Facts) -> tuple[bool, str]:
        """Whether the condition holds for ``facts``, and a sentence saying why."""
        ok, text = self._test(facts)
        if self.negate:
            return (not ok, f"not ({text})")
        return ok, text

    def _test(self, facts: Facts) -> tuple[bool, str]:
        if self.op == "any":
            results = [c.test(facts) for c in self.any]
            for ok, text in results:
                if ok:
                    return True, text
            return False, "none of: " + "; ".join(t for _, t in results)
        if self.op == "age":
            return self._test_age(facts)
        attr = self.attribute or ""
        values = _values(facts, attr)
        if self.op == "present":
            want = self.values == ("true",)
            have = bool(values)
            return have == want, f"{attr} is {'present' if have else 'absent'}"
        if not values:
            return False, f"{attr} is absent"
        who = _quote(attr, values)
        upper = [v.upper() for v in values]
        shown = ", ".join(self.values)
        if self.op == "equals":
            ok = any(v in self.values for v in upper)
            return ok, f"{who} is {'' if ok else 'not '}one of {shown}"
        if self.op == "glob":
            ok = any(fnmatch.fnmatchcase(v, p) for v in upper for p in self.values)
            return ok, f"{who} {'matches' if ok else 'does not match'} {shown}"
        if self.op == "regex":
            assert self._regex is not None
            ok = any(self._regex.search(v) for v in values)
            return ok, f"{who} {'matches' if ok else 'does not match'} the regex {shown}"
        if self.op == "contains":
            hit = next((k for k in self.values for v in upper if k in v), None)
            if hit is not None:
                return True, f"{who} contains {hit}"
            return False, f"{who} does not contain {'/'.join(self.values)}"
        raise AssertionError(self.op)

    def _test_age(self, facts: Facts) -> tuple[bool, str]:
        lo = "" if self.age_min is None else f"{self.age_min:g}"
        hi = "" if self.age_max is None else f"{self.age_max:g}"
        span = f"{lo}..{hi} years"
        age = patient_age_years(facts)
        if age is None:
            return False, "patient age is unknown (no PatientAge, PatientBirthDate/StudyDate)"
        ok = (self.age_min is None or age >= self.age_min) and (
            self.age_max is None or age < self.age_max
        )
        return ok, f"patient age is {'' if ok else 'not '}within {span}"

    def to_dict(self) -> dict[str, Any]:
        """The condition as in the rules file (JSON-ready)."""
        out: dict[str, Any] = {}
        if self.op == "any":
            out["any"] = [c.to_dict() for c in self.any]
        elif self.op == "age":
            out["attribute"] = "PatientAge"
            if self.age_min is not None:
                out["age_min"] = self.age_min
            if self.age_max is not None:
                out["age_max"] = self.age_max
        elif self.op == "present":
            out.update(attribute=self.attribute, present=self.values == ("true",))
        elif self.op == "regex":
            out.update(attribute=self.attribute, regex=self.values[0])
        else:
            out.update(attribute=self.attribute, **{self.op: list(self.values)})
        if self.negate:
            out["not"] = True
        return out


@dataclass(frozen=True, slots=True)
class RoutingRule:
    """A named rule: conditions (all must hold for one series) and an action.

    Parameters
    ----------
    name
        Short name (letters, digits, ``_.-``; at most 64), stored as ``jobs.rule``.
    conditions
        All must hold for one series of the study; none: the rule matches every study.
    draft
        Queue a job (``True``) or skip the study (``False``).
    model
        The model that must draft the job (its bundle's ``model_name``); ``None``: any.
    priority
        The job priority the study gets at least (-1000..1000); ``None``: unchanged.
    destinations
        Where the draft goes (destination text forms); ``None``: every configured one.
    """

    name: str
    conditions: tuple[Condition, ...] = ()
    draft: bool = True
    model: str | None = None
    priority: int | None = None
    destinations: tuple[str, ...] | None = None

    def test(self, series: Sequence[Facts]) -> tuple[int | None, str]:
        """The index of the first series that satisfies every condition (``None`` when
        none does) and the explanation."""
        failures: list[str] = []
        for index, facts in enumerate(series):
            passed: list[str] = []
            failed: str | None = None
            for cond in self.conditions:
                ok, text = cond.test(facts)
                if not ok:
                    failed = text
                    break
                passed.append(text)
            if failed is None:
                why = "; ".join(passed) if passed else "no conditions (matches every study)"
                prefix = f"series {index + 1}: " if len(series) > 1 else ""
                return index, prefix + why
            text = f"{', '.join(passed)} but {failed}" if passed else failed
            failures.append(text)
        unique = list(dict.fromkeys(failures))
        if len(unique) == 1:
            return None, unique[0]
        shown = [f"series {failures.index(u) + 1}: {u}" for u in unique[:_MAX_SERIES_EXPLAINED]]
        if len(unique) > _MAX_SERIES_EXPLAINED:
            shown.append(f"{len(unique) - _MAX_SERIES_EXPLAINED} more series")
        return None, "; ".join(shown)

    @property
    def action(self) -> str:
        """The action in words (no patient data)."""
        if not self.draft:
            return "skip"
        parts = ["draft"]
        if self.model:
            parts.append(f"model {self.model}")
        if self.priority is not None:
            parts.append(f"priority {self.priority}")
        if self.destinations is not None:
            parts.append("to " + (", ".join(self.destinations) or "no destination"))
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The rule as in the rules file (JSON-ready), with ``action`` in words."""
        return {
            "name": self.name,
            "when": [c.to_dict() for c in self.conditions],
            "draft": self.draft,
            "model": self.model,
            "priority": self.priority,
            "destinations": None if self.destinations is None else list(self.destinations),
            "action": self.action,
        }


@dataclass(frozen=True, slots=True)
class RuleResult:
    """How one rule fared: ``matched`` (by series ``series`` + 1) and why."""

    rule: str
    matched: bool
    explanation: str
    series: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary: the fields by name."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """The outcome for a study: draft it or not, and how; ``reason`` in one line.

    ``results`` lists the rules evaluated, in order, up to the one that matched.
    """

    draft: bool
    rule: str | None
    model: str | None
    priority: int | None
    destinations: tuple[str, ...] | None
    reason: str
    results: tuple[RuleResult, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {
            "draft": self.draft,
            "rule": self.rule,
            "model": self.model,
            "priority": self.priority,
            "destinations": None if self.destinations is None else list(self.destinations),
            "reason": self.reason,
            "results": [r.to_dict() for r in self.results],
        }


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Routing rules in order, first match wins; ``source`` says where they came from."""

    rules: tuple[RoutingRule, ...]
    source: str = "default"

    @property
    def attributes(self) -> frozenset[str]:
        """Every attribute some condition reads."""
        return frozenset().union(*(c.attributes for r in self.rules for c in r.conditions))

    @property
    def needs_header(self) -> bool:
        """Whether some condition reads an attribute a node does not record
        (:data:`HEADER_ATTRIBUTES`, or the dates of the computed age)."""
        return bool(self.attributes & (HEADER_ATTRIBUTES | {"PatientBirthDate", "StudyDate"}))

    def evaluate(self, series: Sequence[Facts]) -> RoutingDecision:
        """Route a study given one :data:`Facts` mapping per series (in order).

        Returns
        -------
        RoutingDecision
            The first matching rule's action, or a skip when none matches (or no series
            was received), with each evaluated rule's explanation.
        """
        if not series:
            return RoutingDecision(False, None, None, None, None, "no series received", ())
        results: list[RuleResult] = []
        for rule in self.rules:
            index, why = rule.test(series)
            results.append(RuleResult(rule.name, index is not None, why, index))
            if index is not None:
                return RoutingDecision(
                    draft=rule.draft,
                    rule=rule.name,
                    model=rule.model if rule.draft else None,
                    priority=rule.priority if rule.draft else None,
                    destinations=rule.destinations if rule.draft else None,
                    reason=f"rule {rule.name}: {why}",
                    results=tuple(results),
                )
        if not results:
            reason = "no routing rules"
        else:
            reason = "no rule matched: " + "; ".join(
                f"rule {r.rule}: {r.explanation}" for r in results
            )
        return RoutingDecision(False, None, None, None, None, reason, tuple(results))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return {"source": self.source, "rules": [r.to_dict() for r in self.rules]}


# --- building ------------------------------------------------------------------------------


def chest_conditions(
    *,
    modalities: Sequence[str],
    keywords: Sequence[str],
    match_descriptions: bool,
    require_keyword: bool,
) -> tuple[Condition, ...]:
    """The conditions of the chest rule (``docs/policies.md``).

    Modality (0008,0060) one of ``modalities`` and, with ``require_keyword``, Body Part
    Examined (0018,0015) or, with ``match_descriptions``, Series Description (0008,103E)
    or Study Description (0008,1030) containing one of ``keywords``.
    """
    mods = tuple(m.strip().upper() for m in modalities if m.strip())
    kws = tuple(k.strip().upper() for k in keywords if k.strip())
    out = [Condition("Modality", "equals", mods)]
    if require_keyword:
        where = ["BodyPartExamined"]
        if match_descriptions:
            where += ["SeriesDescription", "StudyDescription"]
        out.append(Condition(None, "any", any=tuple(Condition(a, "contains", kws) for a in where)))
    return tuple(out)


def chest_rule_set(
    *,
    modalities: Sequence[str],
    keywords: Sequence[str],
    match_descriptions: bool = True,
    require_keyword: bool = True,
) -> RuleSet:
    """The default rule set: one rule ``chest`` (draft, all destinations, no model or
    priority change) with :func:`chest_conditions`; other studies are skipped."""
    conds = chest_conditions(
        modalities=modalities,
        keywords=keywords,
        match_descriptions=match_descriptions,
        require_keyword=require_keyword,
    )
    return RuleSet((RoutingRule(CHEST_RULE_NAME, conds),), source="default (chest_rule)")
