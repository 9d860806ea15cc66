"""Settings: defaults, TOML file, environment overrides, and refusals naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.settings import (
    AllowedAE,
    ConfigError,
    DicomDestination,
    FhirDestination,
    Hl7Destination,
    StowDestination,
    load_settings,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CXR_NODE_"):
            monkeypatch.delenv(key)


def test_defaults_are_the_contract() -> None:
    s = load_settings()
    assert (s.ae_title, s.host, s.port) == ("LLMCXR", "127.0.0.1", 11112)
    assert s.database_url == "sqlite:///var/cxr-node.sqlite3"
    assert s.spool_dir == Path("var/spool")
    assert (s.study_quiet_seconds, s.study_max_wait_seconds) == (10.0, 600.0)
    assert s.allowed_aes == [] and s.destinations == []
    assert s.chest_rule.modalities == ["CR", "DX"] and "CHEST" in s.chest_rule.keywords
    assert (s.api_host, s.api_port, s.backend) == ("127.0.0.1", 8080, "transformers")


def test_file_then_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        'ae_title = "FILEAE"\nport = 4242\nstudy_quiet_seconds = 3\n'
        'allowed_aes = ["PACS@10.0.0.1"]\n'
        '[chest_rule]\nmodalities = ["DX"]\n'
    )
    monkeypatch.setenv("CXR_NODE_CONFIG", str(cfg))
    monkeypatch.setenv("CXR_NODE_PORT", "5555")
    monkeypatch.setenv("CXR_NODE_ALLOWED_AES", "ORTHANC@127.0.0.1, MODALITY")
    monkeypatch.setenv(
        "CXR_NODE_DESTINATIONS", "PACS@10.1.2.3:104,https://pacs.example/dicom-web/studies"
    )
    monkeypatch.setenv("CXR_NODE_DATABASE_URL", "postgresql+psycopg://node:s3cret@db:5432/node")
    s = load_settings()
    assert s.ae_title == "FILEAE" and s.study_quiet_seconds == 3  # from the file
    assert s.port == 5555  # env wins over the file
    assert s.allowed_aes == [
        AllowedAE(ae_title="ORTHANC", host="127.0.0.1"),
        AllowedAE(ae_title="MODALITY"),
    ]
    assert s.destinations == [
        DicomDestination(ae_title="PACS", host="10.1.2.3", port=104),
        StowDestination(url="https://pacs.example/dicom-web/studies"),
    ]
    assert s.chest_rule.modalities == ["DX"]
    summary = s.public_summary()
    assert "s3cret" not in str(summary) and "***" in summary["database_url"]
    assert summary["allowed_aes"] == ["ORTHANC@127.0.0.1", "MODALITY"]
    # explicit overrides win over both
    assert load_settings(port=7777).port == 7777


def test_destinations_json_form_with_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CXR_NODE_DESTINATIONS",
        '[{"kind": "dimse", "ae_title": "PACS", "host": "pacs", "port": 104,'
        ' "objects": ["sr", "pdf"]}, "mllps://ris:2575",'
        ' {"kind": "fhir", "base_url": "https://fhir.example/r4", "bearer_token": "t0ken"}]',
    )
    s = load_settings()
    dicom, hl7, fhir = s.destinations
    assert isinstance(dicom, DicomDestination) and dicom.objects == ("sr", "pdf")
    assert isinstance(hl7, Hl7Destination) and hl7.tls and hl7.port == 2575
    assert isinstance(fhir, FhirDestination) and fhir.bearer_token == "t0ken"
    summary = s.public_summary()
    assert "t0ken" not in str(summary) and "t0ken" not in repr(s)
    assert summary["destinations"] == [
        "PACS@pacs:104",
        "mllps://ris:2575",
        "fhir+https://fhir.example/r4",
    ]


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"ae_title": "A" * 17}, "ae_title"),
        ({"ae_title": "BAD\\AE"}, "ae_title"),
        ({"ae_title": "   "}, "ae_title"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"api_port": 65536}, "api_port"),
        ({"study_quiet_seconds": 0}, "study_quiet_seconds"),
        ({"study_quiet_seconds": 20, "study_max_wait_seconds": 10}, "study_max_wait_seconds"),
        ({"host": "0.0.0.0"}, "allowed_aes"),
        ({"host": "192.168.1.5", "allowed_aes": []}, "allowed_aes"),
        ({"allowed_aes": "TOOLONGAETITLE12345"}, "allowed_aes"),
        ({"destinations": "PACS@host"}, "destinations"),
        ({"destinations": "ftp://x/y"}, "destinations"),
        ({"destinations": "PACS@h:104,PACS@h:104"}, "destinations"),
        ({"destinations": '[{"kind": "dimse", "ae_title": "P", "host": "h"}]'}, "destinations"),
        ({"destinations": '[{"kind": "dimse", "ae_title": "P"'}, "destinations"),
        ({"destinations": '[{"kind": "hl7", "host": "h", "port": 1, "x": 1}]'}, "destinations"),
        ({"hl7_sending_application": "A|B"}, "hl7_sending_application"),
        ({"database_url": "mysql://x/y"}, "database_url"),
        ({"database_url": "not a url"}, "database_url"),
        ({"max_associations": 0}, "max_associations"),
        ({"lease_seconds": -1}, "lease_seconds"),
        ({"retention_days": -1}, "retention_days"),
        ({"log_level": "LOUD"}, "log_level"),
        ({"api_port": 11112}, "api_port"),
        ({"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_refusals_name_the_setting(overrides: dict[str, object], names: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    assert names in str(info.value)


def test_env_refusal_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_NODE_STUDY_QUIET_SECONDS", "-5")
    with pytest.raises(ConfigError, match="study_quiet_seconds"):
        load_settings()
    monkeypatch.setenv("CXR_NODE_STUDY_QUIET_SECONDS", "5")
    monkeypatch.setenv("CXR_NODE_HOST", "0.0.0.0")
    with pytest.raises(ConfigError, match="allowed_aes"):
        load_settings()
    monkeypatch.setenv("CXR_NODE_ALLOWED_AES", "PACS@10.0.0.7")
    assert load_settings().host == "0.0.0.0"


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('ae_titel = "TYPO"\n')
    with pytest.raises(ConfigError, match="ae_titel"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="CXR_NODE_CONFIG"):
        load_settings(tmp_path / "missing.toml")


def test_spool_must_be_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="spool_dir"):
        load_settings(spool_dir=blocker / "spool").prepare_runtime()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # root ignores permissions: use an impossible path instead
            with pytest.raises(ConfigError, match="spool_dir"):
                load_settings(spool_dir=Path("/proc/cxr-node-spool")).prepare_runtime()
        else:
            with pytest.raises(ConfigError, match="spool_dir"):
                load_settings(spool_dir=ro).prepare_runtime()
    finally:
        ro.chmod(0o700)
    with pytest.raises(ConfigError, match="min_free_disk_mb"):
        load_settings(spool_dir=tmp_path / "ok", min_free_disk_mb=10**12).prepare_runtime()
    load_settings(spool_dir=tmp_path / "ok", min_free_disk_mb=0).prepare_runtime()
    assert (tmp_path / "ok").is_dir()


def test_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "cxr-node.example.toml"
    s = load_settings(example)
    assert s.allowed_aes and s.destinations


@pytest.mark.parametrize(
    "destination",
    [
        "https://pacs/dicom-web?key=s3cret",
        "fhir+https://fhir/r4?key=s3cret",
        {"kind": "stow", "url": "https://pacs/dicom-web?key=s3cret"},
        {"kind": "fhir", "base_url": "https://fhir/r4#s3cret"},
    ],
)
def test_a_url_with_a_query_is_refused_without_echoing_it(destination: object) -> None:
    """A STOW-RS or FHIR URL with a query or fragment is refused (the senders append paths
    to it; a token goes in ``authorization``/``bearer_token``), and the refusal, which
    ``cxr-node`` prints, does not repeat what may be a token."""
    with pytest.raises(ConfigError, match="no query or fragment") as refused:
        load_settings(destinations=[destination])
    assert "s3cret" not in str(refused.value)
