"""Value types and validators of the settings: AE titles, hosts and ports, the calling-AE
allow-list, destinations, the chest rule and priority rules. Each refusal names its setting.
"""

from __future__ import annotations

import ipaddress
import json
import re
import string
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from integration.destinations import DicomDestination, check_host, parse_destination
from integration.priority import RULE_FIELDS, PriorityRule

__all__ = [
    "AETitle",
    "AllowedAE",
    "ChestRule",
    "ConfigError",
    "Host",
    "NonNegative",
    "Port",
    "PositiveCount",
    "PositiveSeconds",
    "check_viewer_template",
    "is_loopback",
    "not_shorter",
    "parse_ae_address",
    "split_each",
    "validate_ae_title",
    "viewer_url",
    "within",
]

# PS3.5 §6.2 (VR AE): at most 16 characters of the default repertoire, no backslash, no
# control characters; leading and trailing spaces are not significant.
_AE_ALLOWED = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class ConfigError(ValueError):
    """The configuration is unsafe or inconsistent; the message names the setting."""


def validate_ae_title(value: str, *, setting: str = "ae_title") -> str:
    """Return a valid Application Entity title (PS3.5 §6.2, VR AE) or raise.

    Parameters
    ----------
    value
        The AE title; surrounding spaces are removed.
    setting
        Name of the setting, used in the error message.

    Raises
    ------
    ValueError
        Empty, longer than 16 characters, or with a backslash or control character.
    """
    title = str(value).strip()
    if not title:
        raise ValueError(f"{setting}: AE title must not be empty (PS3.5 VR AE)")
    if len(title) > 16:
        raise ValueError(f"{setting}: AE title {title!r} is longer than 16 characters (VR AE)")
    if not _AE_ALLOWED.match(title):
        raise ValueError(
            f"{setting}: AE title {title!r} has a backslash or a non-printable/non-ASCII "
            "character (VR AE)"
        )
    return title


def _validate_host(value: str, *, setting: str) -> str:
    return check_host(value, label=f"{setting}:")


def positive_seconds(value: float, *, setting: str) -> float:
    """``value`` when it is greater than 0, else ``ValueError`` naming ``setting``."""
    if not value > 0:
        raise ValueError(f"{setting}: must be greater than 0 seconds, got {value}")
    return value


def at_least(value: int, minimum: int, *, setting: str) -> int:
    """``value`` when it is at least ``minimum`` (0 or 1), else ``ValueError`` naming
    ``setting``."""
    if value < minimum:
        why = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
        raise ValueError(f"{setting}: {why}, got {value}")
    return value


def _validate_port(value: int, *, setting: str) -> int:
    if not 1 <= int(value) <= 65535:
        raise ValueError(f"{setting}: port {value} is outside 1..65535")
    return int(value)


_V = TypeVar("_V")


def _named(check: Callable[..., _V]) -> AfterValidator:
    """A pydantic field validator that calls ``check(value, setting=<field name>)``, so that
    one check serves every field it annotates and its refusal names the field."""

    def run(value: Any, info: ValidationInfo) -> _V:
        return check(value, setting=str(info.field_name))

    return AfterValidator(run)


def within(low: float, high: float, *, open_low: bool = False, note: str = "") -> AfterValidator:
    """A field validator for a bounded number: ``low <= value <= high`` (``low < value``
    with ``open_low``), else ``ValueError`` "<field>: <value> is outside <range> <note>".
    """
    span = f"({low}, {high}]" if open_low else f"{low}..{high}"
    suffix = f" {note}" if note else ""

    def check(value: float, *, setting: str) -> float:
        above_low = value > low if open_low else value >= low
        if not (above_low and value <= high):
            raise ValueError(f"{setting}: {value} is outside {span}{suffix}")
        return value

    return _named(check)


def not_shorter(settings: BaseModel, longer: str, shorter: str) -> None:
    """Refuse ``settings`` when its field ``longer`` (a limit) is less than its field
    ``shorter`` (the period the limit bounds), naming both."""
    high, low = getattr(settings, longer), getattr(settings, shorter)
    if high < low:
        raise ValueError(f"{longer} ({high}) must not be shorter than {shorter} ({low})")


AETitle = Annotated[str, _named(validate_ae_title)]
"""An Application Entity title (PS3.5 §6.2, VR AE), surrounding spaces removed."""
Host = Annotated[str, _named(_validate_host)]
"""A host name or IP address to bind to or reach (:func:`integration.destinations.check_host`)."""
Port = Annotated[int, _named(_validate_port)]
"""A TCP port, 1..65535."""
PositiveSeconds = Annotated[float, _named(positive_seconds)]
"""A duration in seconds, greater than 0."""
NonNegative = Annotated[int, _named(partial(at_least, minimum=0))]
"""A whole number, 0 or more."""
PositiveCount = Annotated[int, _named(partial(at_least, minimum=1))]
"""A whole number, 1 or more."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names the loopback interface only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AllowedAE(BaseModel):
    """A calling AE allowed to associate: an AE title, optionally pinned to a source host.

    ``host`` is an IP address, a network in CIDR notation, or a host name.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: str
    host: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _title(cls, v: str) -> str:
        return validate_ae_title(v, setting="allowed_aes")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        text = str(v).strip()
        if "/" in text:  # a network in CIDR notation
            try:
                return str(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"allowed_aes: {v!r} is not a network (CIDR)") from None
        return _validate_host(text, setting="allowed_aes")

    @classmethod
    def parse(cls, text: str) -> AllowedAE:
        """Parse ``"AET"`` or ``"AET@host"``."""
        title, sep, host = text.strip().partition("@")
        return cls(ae_title=title, host=host if sep else None)

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


def parse_ae_address(text: str) -> DicomDestination:
    """Parse ``AET@host:port`` (IPv6 hosts in brackets) into a :class:`DicomDestination`.

    Raises
    ------
    ValueError
        When the text does not have that shape or a part is invalid.
    """
    return DicomDestination.parse(text)


def _destinations_from_json(text: str) -> list[Any]:
    """The JSON form of ``destinations`` (needed for options: objects, tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"destinations: not valid JSON: {exc.msg}") from None
    items = value if isinstance(value, list) else [value]
    return [parse_destination(i) if isinstance(i, str) else i for i in items]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return value


def split_each(value: Any, convert: Callable[[Any], Any]) -> Any:
    """A list setting before validation: a comma-separated string (the environment's form)
    becomes its non-empty stripped items, and each item of a list is ``convert(item)``;
    anything else is returned for pydantic to refuse. ``convert`` raises ``ValueError``
    naming the setting for a bad item."""
    items = _split_commas(value)
    return [convert(i) for i in items] if isinstance(items, list) else items


class ChestRule(BaseModel):
    """Which studies are chest radiographs and become jobs (see ``docs/policies.md``).

    A study qualifies when one of its series has a modality in ``modalities`` and (unless
    ``require_keyword`` is false) its Body Part Examined (0018,0015), or, when
    ``match_descriptions``, its Series or Study Description, contains one of ``keywords``
    (case-insensitive).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    keywords: list[str] = Field(default_factory=lambda: ["CHEST", "THORAX", "LUNG", "CXR", "TORAX"])
    match_descriptions: bool = True
    require_keyword: bool = True

    @field_validator("modalities", "keywords", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return _split_commas(v)

    @field_validator("modalities", "keywords")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for item in v:
            s = item.strip().upper()
            if s and s not in out:
                out.append(s)
        return out

    @model_validator(mode="after")
    def _non_empty(self) -> ChestRule:
        if not self.modalities:
            raise ValueError("chest_rule.modalities must list at least one modality")
        if self.require_keyword and not self.keywords:
            raise ValueError("chest_rule.keywords must not be empty when require_keyword is true")
        return self


def _priority_rule(item: Any, index: int) -> PriorityRule:
    """One entry of ``priority_rules``: a table/object ``{when = {...}, priority = N}``."""
    where = f"priority_rules[{index}]"
    if isinstance(item, PriorityRule):
        return item
    if not isinstance(item, dict):
        raise ValueError(
            f'{where}: must be a table {{when = {{FIELD = "PATTERN"}}, priority = N}}, '
            f"got {type(item).__name__}"
        )
    unknown = sorted(str(k) for k in set(item) - {"when", "priority"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; use when and priority")
    if "when" not in item or "priority" not in item:
        raise ValueError(f"{where}: needs both when and priority")
    when, priority = item["when"], item["priority"]
    if not isinstance(when, dict) or not when:
        raise ValueError(
            f"{where}: when must be a non-empty table of field = pattern "
            f"(fields: {', '.join(RULE_FIELDS)})"
        )
    for name, pattern in when.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"{where}: when.{name} must be a non-empty pattern string")
    try:
        return PriorityRule(when={str(k): v for k, v in when.items()}, priority=priority)
    except ValueError as exc:
        raise ValueError(f"{where}: {str(exc).removeprefix('priority rule: ')}") from None


def _priority_rules(value: Any) -> list[PriorityRule]:
    """``priority_rules`` from the TOML file (array of tables), the environment (JSON) or
    an override (rules or dictionaries)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise ValueError(f"priority_rules: not valid JSON: {exc.msg}") from None
    if isinstance(value, dict | PriorityRule):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"priority_rules: must be a list of rules, got {type(value).__name__}")
    return [_priority_rule(item, i) for i, item in enumerate(value)]


_VIEWER_FIELDS = frozenset({"study_uid", "accession"})


def check_viewer_template(template: str | None) -> str | None:
    """Validate ``viewer_url_template``: an http(s) URL whose only ``{...}`` fields are
    ``{study_uid}`` and ``{accession}`` (e.g. OHIF's
    ``https://pacs.example/viewer?StudyInstanceUIDs={study_uid}``); empty is ``None``."""
    if template is None or not template.strip():
        return None
    text = template.strip()
    if not text.lower().startswith(("http://", "https://", "/")):
        raise ValueError("viewer_url_template: must be an http(s) URL or a path on this host")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise ValueError(f"viewer_url_template: {exc}") from None
    unknown = fields - _VIEWER_FIELDS
    if unknown:
        raise ValueError(
            f"viewer_url_template: unknown field(s) {', '.join(sorted(unknown))}; "
            "use {study_uid} and {accession}"
        )
    return text


def viewer_url(template: str | None, *, study_uid: str, accession: str | None) -> str | None:
    """The "open in viewer" URL of a study, its fields URL-encoded; ``None`` without a
    template."""
    if not template:
        return None
    return template.format(
        study_uid=quote(study_uid, safe=""), accession=quote(accession or "", safe="")
    )
