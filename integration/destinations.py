"""Where the node sends its output: one type per protocol, one union for all.

Every destination the node knows is one of these frozen, validated values; the settings
(``CXR_NODE_DESTINATIONS``), the delivery queue and the senders all use them:

| kind | class | protocol | what it gets |
|---|---|---|---|
| ``dimse`` | :class:`DicomDestination` | DIMSE C-STORE (PS3.4 Annex B) | :attr:`objects` |
| ``stow`` | :class:`StowDestination` | DICOMweb STOW-RS (PS3.18 10.5) | :attr:`objects` |
| ``hl7`` | :class:`Hl7Destination` | HL7 v2.5.1 ORU^R01 over MLLP | the draft's text |
| ``fhir`` | :class:`FhirDestination` | FHIR R4 transaction Bundle | DiagnosticReport + PDF |

The DICOM objects a DICOM destination gets (:data:`DICOM_OBJECTS`): ``sr`` the
Comprehensive SR (TID 2000, the default), ``basic-sr`` a Basic Text SR for archives that
store no Comprehensive SR, ``pdf`` the AI DRAFT Encapsulated PDF for viewers that show no
SR. A withdrawal sends a Key Object Selection rejection note (IHE IOCM) to every DICOM
destination whatever its objects.

Text forms (:func:`parse_destination`): ``AET@host:port`` (IPv6 in brackets), an
``http(s)://`` DICOMweb URL, ``mllp://host:port`` (``mllps://`` with TLS) and
``fhir+http(s)://base``. Options (objects, receiving application, a bearer token) need the
JSON form, e.g. ``[{"kind": "dimse", "ae_title": "PACS", "host": "pacs", "port": 104,
"objects": ["sr", "pdf"]}]``. Secrets (``authorization``, ``bearer_token``) are never part
of ``repr`` or ``str``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import field
from typing import Annotated, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
)
from pydantic.dataclasses import dataclass

__all__ = [
    "DICOM_OBJECTS",
    "Destination",
    "DicomDestination",
    "DicomObject",
    "FhirDestination",
    "Hl7Destination",
    "StowDestination",
    "check_ae_title",
    "check_host",
    "parse_destination",
]

DicomObject = Literal["sr", "basic-sr", "pdf", "coded-sr"]
DICOM_OBJECTS: tuple[DicomObject, ...] = ("sr", "basic-sr", "pdf", "coded-sr")

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 VR AE: no backslash/controls
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")
_HL7_ID = re.compile(r"^[^|^~\\&\r\n]{0,180}$")  # an HD component: no HL7 delimiters


def check_host(value: str, *, label: str = "destination host") -> str:
    """Return ``value`` as an IP address (brackets of an IPv6 literal removed) or an RFC 1123
    host name, or raise ``ValueError`` naming it ``label``."""
    host = str(value).strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not host or not _HOSTNAME.match(host):
        raise ValueError(f"{label} {value!r} is neither an IP address nor a host name")
    return host


def _bracketed(host: str) -> str:
    """``host`` as written before ``:port``: an IPv6 literal in brackets (RFC 3986 3.2.2)."""
    return f"[{host}]" if ":" in host else host


def check_ae_title(value: str, *, label: str = "Called AE Title") -> str:
    """Return an AE title (PS3.5 6.2, VR AE: 1-16 printable ASCII characters, no backslash,
    not all spaces) without its surrounding spaces, or raise ``ValueError`` naming it
    ``label``."""
    if not isinstance(value, str) or not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            f"{label} {value!r} is not a valid AE title (1-16 printable ASCII characters, "
            "no backslash, not all spaces)"
        )
    return value.strip()


def _check_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"destination port must be an int, got {value!r}")
    if not 1 <= value <= 65535:
        raise ValueError(f"destination port {value} is out of range 1-65535")
    return value


def _check_url(value: str, what: str) -> str:
    url = value.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} URL {value!r} must be an absolute http(s) URL")
    if parts.password or parts.username:
        raise ValueError(f"{what} URL: put no credentials in the URL")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        # the senders append paths (/studies, /DiagnosticReport) to it, which a query would
        # swallow; a token belongs in authorization / bearer_token, not in the URL (or logs)
        option = "authorization" if what == "STOW-RS" else "bearer_token"
        raise ValueError(
            f"{what} URL: put no query or fragment in the URL (a token goes in the "
            f"destination's {option} option)"
        )
    return url


def _check_objects(value: tuple[DicomObject, ...]) -> tuple[DicomObject, ...]:
    if not value:
        raise ValueError("objects: name at least one of sr, basic-sr, pdf")
    if len(set(value)) != len(value):
        raise ValueError(f"objects: {', '.join(value)} names an object twice")
    return tuple(value)


def _check_timeout(value: float) -> float:
    if value <= 0:
        raise ValueError(f"destination timeout must be > 0, got {value}")
    return value


_STRICT = ConfigDict(extra="forbid")  # a misspelt option is an error, not ignored
Host = Annotated[str, AfterValidator(check_host)]
Port = Annotated[int, BeforeValidator(_check_port)]
Timeout = Annotated[float, AfterValidator(_check_timeout)]
Objects = Annotated[tuple[DicomObject, ...], AfterValidator(_check_objects)]


@dataclass(frozen=True, config=_STRICT)
class DicomDestination:
    """A DICOM peer that accepts C-STORE (a PACS, a viewer, a router).

    Parameters
    ----------
    ae_title
        Called AE Title (VR AE: 1-16 characters, no backslash, not all spaces).
    host
        Host name or IP address.
    port
        TCP port (1-65535).
    objects
        Which draft objects it gets (:data:`DICOM_OBJECTS`); default the Comprehensive SR.
    """

    ae_title: str
    host: Host
    port: Port
    objects: Objects = ("sr",)
    kind: Literal["dimse"] = "dimse"

    @field_validator("ae_title")
    @classmethod
    def _title(cls, v: str) -> str:
        return check_ae_title(v)

    @classmethod
    def parse(cls, text: str) -> DicomDestination:
        """Parse ``"AET@host:port"`` (IPv6 hosts in brackets)."""
        match = re.fullmatch(r"\s*([^@]+)@(\[[^\]]+\]|[^:\s]+):(\d+)\s*", text)
        if match is None:
            raise ValueError(f"destination {text!r} is not of the form AET@host:port")
        host = match.group(2).strip("[]")
        return cls(ae_title=match.group(1).strip(), host=host, port=int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{_bracketed(self.host)}:{self.port}"


@dataclass(frozen=True, config=_STRICT)
class StowDestination:
    """A DICOMweb STOW-RS endpoint (PS3.18 10.5).

    Parameters
    ----------
    url
        The DICOMweb service root (e.g. ``http://pacs:8042/dicom-web``) or its ``/studies``
        resource; ``/studies`` is appended when missing. No credentials in the URL.
    authorization
        Value of the HTTP ``Authorization`` header (e.g. ``"Bearer ..."``), or ``None``.
    verify
        TLS verification for https: ``True``, ``False`` or a CA bundle path (used when the
        caller passes no client of its own).
    timeout
        Request timeout in seconds (likewise).
    objects
        Which draft objects it gets (:data:`DICOM_OBJECTS`).
    """

    url: str
    authorization: str | None = field(default=None, repr=False)
    verify: bool | str = True
    timeout: Timeout = 60.0
    objects: Objects = ("sr",)
    kind: Literal["stow"] = "stow"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        url = _check_url(v, "STOW-RS")
        httpx.URL(url)  # refuses what httpx could not send to
        return url

    @property
    def studies_url(self) -> str:
        """The ``.../studies`` resource the POST goes to."""
        base = self.url.rstrip("/")
        return base if base.endswith("/studies") else f"{base}/studies"

    def __str__(self) -> str:
        return self.url  # as configured: the delivery queue names destinations by this text


@dataclass(frozen=True, config=_STRICT)
class Hl7Destination:
    """A reporting system (RIS, interface engine) that takes HL7 v2 ORU^R01 over MLLP.

    Parameters
    ----------
    host, port
        The MLLP listener.
    receiving_application, receiving_facility
        MSH-5 and MSH-6 (HD namespace IDs), as the receiver expects them; may be empty.
    tls
        MLLP over TLS (``mllps://``), verified against the node's CA file.
    timeout
        Seconds to connect and, separately, to wait for the ACK.
    """

    host: Host
    port: Port
    receiving_application: str = ""
    receiving_facility: str = ""
    tls: bool = False
    timeout: Timeout = 30.0
    kind: Literal["hl7"] = "hl7"

    @field_validator("receiving_application", "receiving_facility")
    @classmethod
    def _hd(cls, v: str) -> str:
        if not _HL7_ID.match(v):
            raise ValueError(f"HL7 receiving application/facility {v!r} holds a delimiter")
        return v

    def __str__(self) -> str:
        return f"{'mllps' if self.tls else 'mllp'}://{_bracketed(self.host)}:{self.port}"


@dataclass(frozen=True, config=_STRICT)
class FhirDestination:
    """A FHIR R4 server (its base URL) and how to reach it.

    Parameters
    ----------
    base_url
        Service base URL, e.g. ``https://fhir.example.org/r4``.
    bearer_token
        OAuth 2.0 / SMART access token sent as ``Authorization: Bearer``; never logged or
        shown in ``repr``. ``None`` for an unauthenticated test server.
    timeout
        Seconds for each request (connect, read, write, pool).
    verify
        TLS verification: ``True``, ``False`` or a CA bundle path.
    """

    base_url: str
    bearer_token: str | None = field(default=None, repr=False)
    timeout: Timeout = 30.0
    verify: bool | str = True
    kind: Literal["fhir"] = "fhir"

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, "FHIR base")

    def __str__(self) -> str:
        return f"fhir+{self.base_url.rstrip('/')}"


Destination = Annotated[
    DicomDestination | StowDestination | Hl7Destination | FhirDestination,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[DicomDestination | StowDestination | Hl7Destination | FhirDestination] = (
    TypeAdapter(Destination)
)


def parse_destination(
    value: str | dict[str, object],
) -> DicomDestination | StowDestination | Hl7Destination | FhirDestination:
    """A destination from its text form or its JSON object.

    Parameters
    ----------
    value
        ``AET@host:port``, ``http(s)://...`` (STOW-RS), ``mllp://host:port`` /
        ``mllps://host:port`` (HL7), ``fhir+http(s)://base`` (FHIR), or a mapping with a
        ``kind`` key and the class's fields.

    Raises
    ------
    ValueError
        The text has none of these shapes or a part is invalid (the message says which).
    """
    if not isinstance(value, str):
        return _ADAPTER.validate_python(value)
    text = value.strip()
    lower = text.lower()
    if lower.startswith(("http://", "https://")):
        return StowDestination(url=text)
    if lower.startswith(("fhir+http://", "fhir+https://")):
        return FhirDestination(base_url=text[len("fhir+") :])
    if lower.startswith(("mllp://", "mllps://")):
        parts = urlsplit(text)
        if not parts.hostname or parts.port is None or parts.path not in ("", "/"):
            raise ValueError(f"destination {text!r} is not of the form mllp://host:port")
        return Hl7Destination(
            host=parts.hostname, port=parts.port, tls=parts.scheme.lower() == "mllps"
        )
    return DicomDestination.parse(text)
