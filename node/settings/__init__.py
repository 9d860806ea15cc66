"""Typed settings of the node: a TOML file plus ``CXR_NODE_*`` environment variables.

Precedence (highest first): keyword overrides given to :func:`load_settings`, environment
variables ``CXR_NODE_<FIELD>``, the TOML file named by ``CXR_NODE_CONFIG`` (or the
``config_file`` argument), then the defaults below. Unsafe or inconsistent values are refused
when the object is built, with a message that names the setting; checks that touch the
filesystem (spool directory writable, free disk) run in :meth:`Settings.prepare_runtime`, which
``cxr-node serve`` calls at start-up. ``docs/configuration.md`` is the reference.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    Field,
    InstanceOf,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from integration.destinations import (
    Destination,
    DicomDestination,
    FhirDestination,
    Hl7Destination,
    StowDestination,
    parse_destination,
)
from integration.priority import PriorityRule
from integration.routing import RuleSet
from node.settings.bounds import BoundsSettings
from node.settings.engine import RemoteEngineSettings
from node.settings.receiving import ReceiverSettings
from node.settings.reports import ReportIntakeSettings
from node.settings.routing import load_rule_set
from node.settings.storage import StorageSettings
from node.settings.values import (
    AllowedAE,
    ChestRule,
    ConfigError,
    Host,
    Port,
    PositiveCount,
    PositiveSeconds,
    _destinations_from_json,
    _priority_rules,
    check_viewer_template,
    is_loopback,
    not_shorter,
    parse_ae_address,
    split_each,
    validate_ae_title,
)
from node.settings.worker import WorkerSettings

__all__ = [
    "SECRET_URL_PARAMETERS",
    "AllowedAE",
    "ChestRule",
    "ConfigError",
    "Destination",
    "DicomDestination",
    "FhirDestination",
    "Hl7Destination",
    "PriorityRule",
    "Settings",
    "StowDestination",
    "load_settings",
    "parse_ae_address",
    "validate_ae_title",
]

CONFIG_ENV = "CXR_NODE_CONFIG"
ENV_PREFIX = "CXR_NODE_"
REMOVED_SETTINGS = {
    "backend_speculative": "speculative decoding is no longer part of the llama.cpp backend",
}
"""Settings that earlier versions took, and why they are gone: setting one is an error."""
SECRET_URL_PARAMETERS = frozenset({"password", "sslpassword"})
"""Query parameters of ``database_url`` that carry a secret (libpq's connection parameters
``password`` and ``sslpassword``): masked like the user part's password."""

AnyDestination = DicomDestination | StowDestination | Hl7Destination | FhirDestination

_FROM_ENV = Path("\0from-env")  # sentinel: Settings() built directly reads $CXR_NODE_CONFIG
_config_file: ContextVar[Path | None] = ContextVar("cxr_node_config_file", default=_FROM_ENV)


class Settings(
    ReceiverSettings,
    StorageSettings,
    WorkerSettings,
    BoundsSettings,
    ReportIntakeSettings,
    RemoteEngineSettings,
    BaseSettings,
):
    """Every setting of the node; see ``docs/configuration.md`` for the reference."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        case_sensitive=False,
    )

    # study assembly
    study_quiet_seconds: PositiveSeconds = 10.0
    study_max_wait_seconds: PositiveSeconds = 600.0
    chest_rule: ChestRule = Field(default_factory=ChestRule)
    # routing rules (TOML, docs/configuration.md "Routing rules"); None: the chest rule alone
    routing_rules_file: Path | None = None
    _rule_set: RuleSet | None = PrivateAttr(default=None)
    # job priority: the order's Requested Procedure Priority, raised by these site rules
    priority_rules: Annotated[list[InstanceOf[PriorityRule]], NoDecode] = Field(
        default_factory=list
    )
    # delivery
    destinations: Annotated[list[Destination], NoDecode] = Field(default_factory=list)
    # MSH-3 / MSH-4 of HL7 messages (HD namespace IDs, as agreed with the RIS interface team)
    hl7_sending_application: str = "LLMCXR"
    hl7_sending_facility: str = "LLMCXR"
    delivery_max_attempts: PositiveCount | None = None  # optional cap; delivery_retry_hours decides
    delivery_backoff_seconds: PositiveSeconds = 5.0
    delivery_max_backoff_seconds: PositiveSeconds = 600.0
    # DICOM TLS (PS3.15 Annex B.1, TLS secure transport) for the SCP and the SCU
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_require_client_cert: bool = True
    tls_destinations: bool = False
    # admin API and logging
    api_enabled: bool = True
    api_host: Host = "127.0.0.1"
    api_port: Port = 8080
    log_level: str = "INFO"
    # the console's "open in viewer" link: {study_uid} and {accession} are filled in
    viewer_url_template: str | None = None
    api_tls: bool | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Overrides, then environment, then the TOML file (no .env, no secrets dir)."""
        path = _config_file.get()
        if path == _FROM_ENV:
            path = Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- field checks -------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, data: Any) -> Any:
        """Refuse settings that no longer exist, naming them and saying why (from the TOML
        file, the overrides or the environment), rather than calling them unknown."""
        keys = {str(k).lower() for k in data} if isinstance(data, dict) else set()
        env = {k.upper() for k in os.environ}
        for name, why in REMOVED_SETTINGS.items():
            var = f"{ENV_PREFIX}{name}".upper()
            if name in keys or var in env:
                raise ValueError(
                    f"{name}: removed ({why}); delete it from the configuration file and "
                    f"unset {var}"
                )
        return data

    @field_validator("priority_rules", mode="before")
    @classmethod
    def _priority_rules(cls, v: Any) -> Any:
        return _priority_rules(v)

    @field_validator("destinations", mode="before")
    @classmethod
    def _destinations(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().startswith(("[", "{")):
            return _destinations_from_json(v.strip())
        return split_each(v, lambda i: parse_destination(i) if isinstance(i, str) else i)

    @field_validator("hl7_sending_application", "hl7_sending_facility")
    @classmethod
    def _hl7_hd(cls, v: str, info: ValidationInfo) -> str:
        if not v.strip() or len(v) > 227 or any(c in v for c in "|^~\\&\r\n"):
            raise ValueError(
                f"{info.field_name}: {v!r} must be 1-227 characters without HL7 delimiters"
            )
        return v.strip()

    @field_validator("destinations")
    @classmethod
    def _distinct_destinations(cls, v: list[AnyDestination]) -> list[AnyDestination]:
        seen: set[str] = set()
        for dest in v:
            if str(dest) in seen:  # the delivery queue names a destination by this text
                raise ValueError(f"destinations: {dest} is listed twice")
            seen.add(str(dest))
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        level = v.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"log_level: {v!r} is not DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        not_shorter(self, "study_max_wait_seconds", "study_quiet_seconds")
        if not is_loopback(self.host) and not self.allowed_aes:
            raise ValueError(
                f"allowed_aes: empty while host={self.host!r} is not loopback; the storage SCP "
                "would accept any calling AE from the network. List the PACS AE titles "
                "(AET or AET@host) or bind to 127.0.0.1"
            )
        if self.host == self.api_host and self.port == self.api_port:
            raise ValueError(f"api_port: {self.api_port} is the DICOM port as well")
        if self.reuse_port and not self.spool_shared:
            raise ValueError(
                "reuse_port: several receivers on one port record into one spool; set "
                "spool_shared = true so that a starting receiver leaves the others' staged "
                "files alone"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "tls_cert_file: DICOM TLS needs both tls_cert_file and tls_key_file (or neither)"
            )
        if self.tls_destinations and self.tls_ca_file is None:
            raise ValueError(
                "tls_ca_file: tls_destinations is on but no CA file is set to verify the PACS"
            )
        if self.backend not in ("transformers", "llamacpp", "remote"):
            raise ValueError(
                f"backend: {self.backend!r} is not 'transformers', 'llamacpp' or 'remote'"
            )
        if self.backend == "remote" and not self.remote_urls:
            raise ValueError("remote_urls: backend 'remote' needs at least one server URL")
        return self

    # --- admin API bounds ---------------------------------------------------------------

    @field_validator("viewer_url_template")
    @classmethod
    def _viewer_url(cls, v: str | None) -> str | None:
        return check_viewer_template(v)

    @model_validator(mode="after")
    def _api_transport(self) -> Settings:
        has_cert = self.tls_cert_file is not None and self.tls_key_file is not None
        if self.api_tls and not has_cert:
            raise ValueError(
                "api_tls: HTTPS for the admin API needs tls_cert_file and tls_key_file"
            )
        if self.api_tls is None and not has_cert and not is_loopback(self.api_host):
            raise ValueError(
                f"api_tls: the admin API would serve plain HTTP on {self.api_host!r}, where "
                "tokens and session cookies cross the network in clear. Set tls_cert_file and "
                "tls_key_file (HTTPS), bind api_host to 127.0.0.1, or set api_tls = false "
                "(e.g. behind a TLS-terminating proxy)"
            )
        return self

    @model_validator(mode="after")
    def _routing_rules(self) -> Settings:
        self._rule_set = load_rule_set(
            self.routing_rules_file, chest=self.chest_rule, destinations=self.destinations
        )
        return self

    # --- helpers ------------------------------------------------------------------------

    @property
    def routing_rules(self) -> RuleSet:
        """The routing rules (:mod:`integration.routing`), read and checked at start-up."""
        if self._rule_set is None:
            self._rule_set = load_rule_set(
                self.routing_rules_file, chest=self.chest_rule, destinations=self.destinations
            )
        return self._rule_set

    @property
    def api_https(self) -> bool:
        """Whether the admin API serves HTTPS: ``api_tls``, or by default whenever
        ``tls_cert_file`` and ``tls_key_file`` are set."""
        if self.api_tls is not None:
            return self.api_tls
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def public_database_url(self) -> str:
        """``database_url`` with its passwords masked (``***``), for messages and logs: the
        user part's, and libpq's ``password`` and ``sslpassword`` query parameters
        (:data:`SECRET_URL_PARAMETERS`)."""
        url = make_url(self.database_url)
        secret = {k: "***" for k in url.query if k.lower() in SECRET_URL_PARAMETERS}
        if not secret:
            return url.render_as_string(hide_password=True)
        text = url.update_query_dict(secret).render_as_string(hide_password=True)
        return text.replace("=%2A%2A%2A", "=***")  # as the user part's mask reads

    def public_summary(self) -> dict[str, Any]:
        """The effective configuration without secrets (the database password is masked)."""
        data = self.model_dump(mode="json")
        data["database_url"] = self.public_database_url
        data["allowed_aes"] = [str(a) for a in self.allowed_aes]
        # a destination's text form holds no secret: URLs take no credentials, query or
        # fragment (integration.destinations), tokens live in options str() leaves out
        data["destinations"] = [str(d) for d in self.destinations]
        return data


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        # messages from our validators already start with the setting's name
        if loc and not msg.startswith(loc.split(".")[0]):
            msg = f"{loc}: {msg}"
        lines.append(msg)
    return "; ".join(lines)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, ``CXR_NODE_*`` variables and the TOML file.

    Parameters
    ----------
    config_file
        TOML file; defaults to ``$CXR_NODE_CONFIG`` when set. A named file that does not
        exist is an error.
    **overrides
        Field values that win over everything else (used by tests and the CLI).

    Raises
    ------
    ConfigError
        With one message per refused value, each naming its setting.
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = os.environ[CONFIG_ENV]
    path = Path(config_file) if config_file is not None else None
    if path is not None and not path.is_file():
        raise ConfigError(f"{CONFIG_ENV}: configuration file {path} does not exist")
    token = _config_file.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None
    except ValueError as exc:  # e.g. TOML syntax errors
        raise ConfigError(f"{CONFIG_ENV}: {exc}") from None
    finally:
        _config_file.reset(token)
