"""What ``deploy/`` says about the node holds in the node's code: every ``CXR_NODE_*``
variable is a setting, each role's configuration (the ConfigMap's TOML or Compose's
environment, plus the role's variables) loads with the node's settings loader and gives that
role what it needs, every ``cxr-node`` command and option exists, every probe path is a
route of the API, the ports are the settings' defaults, and the references between the
files (secrets, volumes, services, the engine's URL and GGUF) resolve."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
from sqlalchemy.orm import sessionmaker

from node.settings import Settings, load_settings
from tests.deploy import manifests as m

#: variables the node reads beside its settings: the configuration file's path
NON_SETTING_VARIABLES = {"CONFIG"}

RECEIVER_PORT = Settings.model_fields["port"].default
API_PORT = Settings.model_fields["api_port"].default
SPOOL_MOUNT = "/var/lib/cxr-node/spool"
MODEL_MOUNT = "/models/llm-cxr"


def _node_containers() -> list[m.Container]:
    return [c for c in m.all_containers() if c.argv[:1] == ["cxr-node"]]


def _ids(containers: list[m.Container]) -> list[str]:
    return [c.where for c in containers]


# --- settings ------------------------------------------------------------------------------


def _variables_used() -> Iterator[tuple[str, str]]:
    for c in m.all_containers():
        for name in c.env:
            yield c.where, name
    for name in m.read_env_file():
        yield ".env.example", name


def test_every_cxr_node_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    seen = 0
    for where, name in _variables_used():
        if not name.upper().startswith(m.ENV_PREFIX):
            continue
        seen += 1
        assert name == name.upper(), f"{where}: {name} (the node's variables are upper case)"
        setting = name[len(m.ENV_PREFIX) :].lower()
        assert setting in fields or setting.upper() in NON_SETTING_VARIABLES, (
            f"{where}: {name} names no setting of the node"
        )
    assert seen > 20


def test_interpolation_variables_are_not_node_settings() -> None:
    """Compose's own ${...} variables must not look like the node's: the node reads none."""
    raw = m.COMPOSE_FILE.read_text(encoding="utf-8")
    names = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", raw))
    assert names and not any(n.startswith(m.ENV_PREFIX) for n in names)
    assert names <= set(m.read_env_file()), "every variable has a line in .env.example"


def _settings_for(
    container: m.Container, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Settings:
    """The settings the container's process would build: the ConfigMap's file (Kubernetes)
    and the container's environment."""
    for name in list(os.environ):
        if name.upper().startswith(m.ENV_PREFIX):
            monkeypatch.delenv(name)
    env = dict(container.env)
    config: Path | None = None
    if "CXR_NODE_CONFIG" in env:
        config = tmp_path / "cxr-node.toml"
        config.write_text(m.configmap_toml(), encoding="utf-8")
        env.pop("CXR_NODE_CONFIG")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(config)


@pytest.mark.parametrize("container", _node_containers(), ids=_ids(_node_containers()))
def test_each_role_configuration_loads_and_fits_the_role(
    container: m.Container, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = _settings_for(container, monkeypatch, tmp_path)
    backend = container.env.get("CXR_NODE_BACKEND")
    assert settings.database_backend == "postgresql"
    assert str(settings.spool_dir) == SPOOL_MOUNT
    role = container.role
    if role in ("receiver", "api", "worker"):
        assert container.mounts.get(SPOOL_MOUNT) is False, "the spool, mounted read-write"
    if role == "receiver":
        assert settings.model_dir is None, "a receiver runs no model and no worker"
        assert not settings.api_enabled
        assert settings.host == "0.0.0.0" and settings.port == RECEIVER_PORT
        assert settings.allowed_aes, "a receiver on the network needs allowed_aes"
    elif role == "api":
        assert settings.api_enabled and settings.api_host == "0.0.0.0"
        assert settings.api_port == API_PORT
        assert settings.api_https, "a non-loopback API serves HTTPS"
        assert settings.host == "127.0.0.1", "the API's own SCP stays on loopback"
        assert str(settings.model_dir) == MODEL_MOUNT and container.mounts[MODEL_MOUNT]
    elif role == "worker":
        assert str(settings.model_dir) == MODEL_MOUNT and container.mounts[MODEL_MOUNT]
    elif role == "db upgrade":
        pass
    else:
        pytest.fail(f"{container.where}: unexpected role {role!r}")
    if role in ("api", "worker"):
        assert backend == "remote" and container.env["CXR_NODE_REMOTE_URLS"]


def test_roles_share_database_and_destinations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Workers build the outputs and serve processes send them: one list for all."""
    for containers in (m.compose_containers(), m.k8s_containers()):
        seen = set()
        for c in containers:
            if c.argv[:1] != ["cxr-node"]:
                continue
            s = _settings_for(c, monkeypatch, tmp_path)
            seen.add((s.database_url, tuple(str(d) for d in s.destinations), s.ae_title))
        assert len(seen) == 1, seen


# --- commands ------------------------------------------------------------------------------


def _cli() -> Any:
    """The ``cxr-node`` command tree (typer's click objects; typer may vendor its click, so
    groups are told by their ``commands``)."""
    from node.cli.main import app

    group = typer.main.get_command(app)
    assert isinstance(getattr(group, "commands", None), dict)
    return group


def _commands() -> Iterator[tuple[str, list[str]]]:
    for c in m.all_containers():
        yield c.where, c.argv
        for probe in c.exec_probes:
            yield f"{c.where} probe", probe
    for target in ("node", "engine"):
        entry, cmd = m.dockerfile_entrypoint_and_cmd(target)
        yield f"Dockerfile {target}", [*entry, *cmd]
        check = m.dockerfile_healthcheck(target)
        assert check, f"Dockerfile stage {target} has a HEALTHCHECK"
        yield f"Dockerfile {target} HEALTHCHECK", check


def _check_cxr_node(argv: list[str], where: str) -> None:
    command = _cli()
    words = argv[1:]
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        assert words[0] in command.commands, f"{where}: `cxr-node` has no command {words[0]!r}"
        command = command.commands[words[0]]
        words = words[1:]
    assert not hasattr(command, "commands"), f"{where}: {argv} names a group, not a command"
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for word in words:
        if word.startswith("-"):
            assert word.split("=")[0] in options, f"{where}: {command.name} has no {word}"


def test_every_command_exists() -> None:
    probe_parser = m.load_probe().build_parser()
    kinds = set()
    for where, argv in _commands():
        kinds.add(argv[0])
        if argv[0] == "cxr-node":
            _check_cxr_node(argv, where)
        elif argv[0] == "cxr-node-probe":
            probe_parser.parse_args(argv[1:])  # exits (SystemExit) on a bad command line
        elif argv[:3] == ["python", "-m", "llama_cpp.server"]:
            pass  # test_engine_serves_the_bundles_gguf
        else:
            pytest.fail(f"{where}: unexpected program {argv}")
    assert kinds == {"cxr-node", "cxr-node-probe", "python"}


def test_the_probe_is_installed_as_the_command_the_files_run() -> None:
    text = m.DOCKERFILE.read_text(encoding="utf-8")
    assert "COPY --chmod=0755 deploy/compose/probe.py /usr/local/bin/cxr-node-probe" in text


# --- probes and ports ----------------------------------------------------------------------


def _api_paths() -> set[str]:
    from node.api.app import create_app
    from node.services.context import ServiceContext

    ctx = ServiceContext(
        settings=Settings(), read_sessions=sessionmaker(), write_sessions=sessionmaker()
    )
    app = create_app(ctx, include_web=False)
    return set(app.openapi()["paths"])


def _probe_args(argv: list[str]) -> Any | None:
    """The parsed command line of a ``cxr-node-probe`` probe, else ``None``."""
    if argv[:1] != ["cxr-node-probe"]:
        return None
    return m.load_probe().build_parser().parse_args(argv[1:])


def _http_probe_urls() -> Iterator[tuple[str, str, int, str]]:
    """(where, path, port, scheme) of every HTTP probe of the node."""
    for c in m.all_containers():
        for path, port, scheme in c.http_probes:
            number = c.ports[port] if isinstance(port, str) else port
            yield c.where, path, number, scheme.lower()
        for probe in c.exec_probes:
            args = _probe_args(probe)
            if args is not None and args.kind == "http":
                url = urlsplit(args.url)
                assert url.hostname == "127.0.0.1", f"{c.where}: probes ask their own container"
                assert url.port is not None
                yield c.where, url.path, url.port, url.scheme


def test_probe_paths_are_routes_of_the_api_on_its_port() -> None:
    paths = _api_paths()
    assert {"/health", "/ready"} <= paths
    assert m.load_probe().HEALTH_PATH in paths  # the probe's fallback without a token
    seen = 0
    for where, path, port, scheme in _http_probe_urls():
        seen += 1
        assert path in paths, f"{where}: {path} is not a route of the node's API"
        assert port == API_PORT, f"{where}: the API listens on api_port {API_PORT}"
        assert scheme == "https", f"{where}: the API serves HTTPS (TLS secrets are set)"
    assert seen >= 3


def test_ready_needs_a_token_and_health_does_not() -> None:
    """Why /ready is probed by the script with a token file and /health by httpGet."""
    from fastapi.testclient import TestClient

    from node.api.app import create_app
    from node.services.context import ServiceContext

    ctx = ServiceContext(
        settings=Settings(), read_sessions=sessionmaker(), write_sessions=sessionmaker()
    )
    client = TestClient(create_app(ctx, include_web=False))
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 401
    for c in m.k8s_containers():
        for path, _, _ in c.http_probes:
            assert path == "/health", f"{c.where}: an httpGet probe cannot send a token"


def test_tcp_probes_and_ports_match_the_settings() -> None:
    for c in m.all_containers():
        role = c.role
        tcp_ports = [c.ports[p] if isinstance(p, str) else p for p in c.tcp_probes]
        for probe in c.exec_probes:
            args = _probe_args(probe)
            if args is not None and args.kind == "tcp":
                host, _, port = args.address.rpartition(":")
                assert host == "127.0.0.1"
                tcp_ports.append(int(port))
        if role == "receiver":
            assert tcp_ports and set(tcp_ports) == {RECEIVER_PORT}, c.where
            assert set(c.ports.values()) == {RECEIVER_PORT}, c.where
        elif role == "api":
            assert set(c.ports.values()) == {API_PORT}, c.where
        elif role == "engine":
            assert tcp_ports and set(tcp_ports) == {_engine_port(c)}, c.where
        else:
            assert not tcp_ports and not c.ports, f"{c.where}: {role} serves no port"
    assert m.dockerfile_healthcheck("node") == [
        "cxr-node-probe",
        "tcp",
        f"127.0.0.1:{RECEIVER_PORT}",
    ]


def test_kubernetes_services_select_pods_and_name_their_ports() -> None:
    pods = {}
    for d in m.k8s_objects("Deployment"):
        template = d["spec"]["template"]
        assert (
            d["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        )
        pods[d["metadata"]["name"]] = template
    for svc in m.k8s_objects("Service"):
        selector = svc["spec"]["selector"]
        matched = [t for t in pods.values() if selector.items() <= t["metadata"]["labels"].items()]
        assert len(matched) == 1, svc["metadata"]["name"]
        names = {
            p["name"]: p["containerPort"]
            for c in matched[0]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names
            assert port["port"] == names[port["targetPort"]]
    receiver = next(s for s in m.k8s_objects("Service") if s["metadata"]["name"] == "receiver")
    assert receiver["spec"]["type"] in ("LoadBalancer", "NodePort")
    assert receiver["spec"]["ports"][0]["port"] == RECEIVER_PORT
    assert receiver["spec"]["externalTrafficPolicy"] == "Local"  # allowed_aes sees the PACS
    assert receiver["spec"]["sessionAffinity"] == "None"
    api = next(s for s in m.k8s_objects("Service") if s["metadata"]["name"] == "api")
    assert api["spec"]["ports"][0]["port"] == API_PORT


# --- the engine ----------------------------------------------------------------------------


def _engine_args(c: m.Container) -> dict[str, str]:
    assert c.argv[:3] == ["python", "-m", "llama_cpp.server"]
    words = c.argv[3:]
    assert len(words) % 2 == 0 and all(w.startswith("--") for w in words[::2]), words
    return {k[2:]: v for k, v in zip(words[::2], words[1::2], strict=True)}


def _engine_port(c: m.Container) -> int:
    return int(_engine_args(c)["port"])


def _engines() -> list[m.Container]:
    engines = [c for c in m.all_containers() if c.role == "engine"]
    assert len(engines) == 2  # compose and kubernetes
    return engines


def test_engine_serves_the_bundles_gguf() -> None:
    from models.gguf_convert import engine_rel_path

    gguf = f"{MODEL_MOUNT}/{engine_rel_path('q8_0')}"
    for c in _engines():
        args = _engine_args(c)
        assert args["model"] == gguf, c.where
        assert args["host"] == "0.0.0.0" and args["n_ctx"] == "2048"
        assert args["interrupt_requests"] == "false", "a waiting request must not cut another"
        assert c.mounts[MODEL_MOUNT] is True, f"{c.where}: the bundle, read-only"
    entry, cmd = m.dockerfile_entrypoint_and_cmd("engine")
    assert entry == ["python", "-m", "llama_cpp.server"] and gguf in cmd


def test_engine_options_are_llama_cpp_server_settings() -> None:
    try:
        from llama_cpp.server.settings import Settings as EngineSettings
    except Exception as exc:  # llama-cpp-python is the optional llamacpp extra
        pytest.skip(f"llama_cpp.server not importable: {type(exc).__name__}")
    for c in _engines():
        for option in _engine_args(c):
            assert option in EngineSettings.model_fields, f"{c.where}: --{option}"
        for name in c.env:  # its settings read from the environment (pydantic-settings)
            assert name.lower() in EngineSettings.model_fields, f"{c.where}: {name}"


def test_the_node_sends_the_key_the_engine_asks_for() -> None:
    for containers in (m.compose_containers(), m.k8s_containers()):
        (engine,) = [c for c in containers if c.role == "engine"]
        key = engine.env["API_KEY"]
        senders = [c for c in containers if c.env.get("CXR_NODE_REMOTE_URLS")]
        assert {c.role for c in senders} == {"api", "worker"}
        for c in senders:
            assert c.env.get("CXR_NODE_REMOTE_API_KEY") == key, c.where


def test_remote_urls_name_the_engine_service() -> None:
    compose = m.compose()
    k8s_services = {s["metadata"]["name"]: s for s in m.k8s_objects("Service")}
    for c in _node_containers():
        urls = c.env.get("CXR_NODE_REMOTE_URLS")
        if not urls:
            continue
        for url in urls.split(","):
            parts = urlsplit(url.strip())
            assert parts.scheme == "http" and parts.hostname == "engine", c.where
            if c.where.startswith("compose"):
                assert "engine" in compose["services"]
                engine = next(e for e in _engines() if e.where.startswith("compose"))
                assert parts.port == _engine_port(engine)
            else:
                assert parts.port == k8s_services["engine"]["spec"]["ports"][0]["port"]


def test_remote_backend_processes_start_after_the_engine_answers() -> None:
    """The remote backend loads once, at start, and its load asks the engine (a process
    started before the engine answers stays without a model until restarted)."""
    services = m.compose()["services"]
    assert services["engine"]["healthcheck"]["test"]
    for c in m.compose_containers():
        if c.env.get("CXR_NODE_REMOTE_URLS"):
            name = c.where.rsplit(".", 1)[-1]
            assert services[name]["depends_on"]["engine"]["condition"] == "service_healthy"
    for where, pod in m.k8s_pod_specs():
        env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
        urls = env.get("CXR_NODE_REMOTE_URLS")
        if not urls:
            continue
        waits = [_probe_args(i["command"]) for i in pod.get("initContainers", [])]
        targets = {f"{a.address}" for a in waits if a is not None and a.kind == "tcp" and a.wait}
        wanted = {urlsplit(u.strip()).netloc for u in urls.split(",")}
        assert targets == wanted, f"{where}: an init container waits for {wanted}"


# --- references, volumes, security ---------------------------------------------------------


def test_compose_references_resolve() -> None:
    data = m.compose()
    services, volumes, secrets = data["services"], data["volumes"], data["secrets"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on a missing {dep}"
        for secret in svc.get("secrets", []):
            assert (secret if isinstance(secret, str) else secret["source"]) in secrets
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            assert source in volumes, f"{name}: volume {source} is not declared"
    mounts = {c.where.split(".")[-1]: c.mounts for c in m.compose_containers()}
    for role in ("receiver", "api", "worker"):
        assert mounts[role][SPOOL_MOUNT] is False, f"{role}: the shared spool, read-write"
    for role in ("api", "worker", "engine"):
        assert mounts[role][MODEL_MOUNT] is True, f"{role}: the model bundle, read-only"
    assert services["migrate"]["restart"] == "no"
    for role in ("receiver", "api", "worker"):
        assert services[role]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["worker"]["deploy"]["replicas"] >= 1
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    modalities = services["orthanc"]["environment"]["ORTHANC__DICOM_MODALITIES"]
    assert f'"receiver", {RECEIVER_PORT}' in modalities and '"LLMCXR"' in modalities


def test_kubernetes_references_resolve() -> None:
    secrets = {s["metadata"]["name"]: s for s in m.k8s_objects("Secret")}
    claims = {c["metadata"]["name"]: c for c in m.k8s_objects("PersistentVolumeClaim")}
    maps = {c["metadata"]["name"] for c in m.k8s_objects("ConfigMap")}
    for where, pod in m.k8s_pod_specs():
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, where
            if "configMap" in volume:
                assert volume["configMap"]["name"] in maps, where
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, where
    assert claims["cxr-node-spool"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims["cxr-node-models"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    for c in m.k8s_containers():
        if MODEL_MOUNT in c.mounts:
            assert c.mounts[MODEL_MOUNT] is True, f"{c.where}: the bundle, read-only"
    engine = next(d for d in m.k8s_objects("Deployment") if d["metadata"]["name"] == "engine")
    limits = engine["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    receiver = next(d for d in m.k8s_objects("Deployment") if d["metadata"]["name"] == "receiver")
    assert receiver["spec"]["replicas"] == 2


def _dockerfile_uid() -> int:
    match = re.search(r"useradd [^\n]*--uid (\d+)", m.DOCKERFILE.read_text(encoding="utf-8"))
    assert match
    return int(match.group(1))


def test_kubernetes_pods_run_non_root_read_only_with_limits() -> None:
    uid = _dockerfile_uid()
    for where, pod in m.k8s_pod_specs():
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == uid, where
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        for container in pod["containers"] + pod.get("initContainers", []):
            csc = container["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["capabilities"]["drop"] == ["ALL"], where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert {"cpu", "memory"} <= set(resources["limits"]), where
            if container in pod["containers"]:
                mounts = {v["mountPath"] for v in container["volumeMounts"]}
                assert "/tmp" in mounts, f"{where}: a writable /tmp on a read-only root"


def test_dockerfile_pins_torch_as_the_project_and_runs_non_root() -> None:
    text = m.DOCKERFILE.read_text(encoding="utf-8")
    setup = (m.ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    (pinned,) = set(re.findall(r'"torch==([0-9][0-9.]*)"', setup))
    assert f"ARG TORCH_VERSION={pinned}" in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.12-slim$", text, re.M)
    assert 'pip install ".[postgres,api]"' in text
    for target in ("node", "engine"):
        lines = list(m.dockerfile_lines(target))
        assert f"USER {_dockerfile_uid()}:{_dockerfile_uid()}" in lines, target
        assert any(line.startswith("HEALTHCHECK") for line in lines), target
    for source in re.findall(r"^COPY (?:--chmod=\S+ )?([^-\s]\S*) ", text, re.M):
        assert (m.ROOT / source).exists(), f"Dockerfile copies a missing {source}"
