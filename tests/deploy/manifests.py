"""Readers of ``deploy/`` for the deployment tests: the Compose file with its ``.env.example``
filled in, the Kubernetes manifests, and what each container of either runs (command,
environment, probes, mounts), so that the tests can hold them against the node's code."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
K8S_DIR = DEPLOY / "kubernetes"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
SCHEMAS = Path(__file__).resolve().parent / "schemas"

#: the Kubernetes version whose schemas (bundled by kubernetes-validate) the manifests meet
KUBERNETES_VERSION = "1.32.0"
#: the image names of the node and of the engine (compose.yaml, the manifests)
NODE_IMAGE = "llm-cxr-node"
ENGINE_IMAGE = "llm-cxr-node-engine"
ENV_PREFIX = "CXR_NODE_"


def load_probe() -> Any:
    """``deploy/compose/probe.py`` (``cxr-node-probe``) loaded as a module, as the image runs it.

    Returns
    -------
    module
        A fresh module object named ``cxr_node_probe``.
    """
    spec = importlib.util.spec_from_file_location("cxr_node_probe", COMPOSE_DIR / "probe.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_yaml(path: Path) -> Any:
    """One YAML document (merge keys ``<<`` resolved, as Compose does)."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """``KEY=value`` lines of a Compose ``.env`` file (comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=value: {line!r}"
        values[key.strip()] = value.strip()
    return values


_VAR = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation (``${V}``, ``${V:-default}``, ``${V-default}``,
    ``${V:?error}``, ``${V?error}``, ``$$``); a required variable that is unset raises."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = env.get(name)
        if op in (":-", ":?") and value == "":
            value = None
        if value is not None:
            return value
        if op in (":?", "?"):
            raise KeyError(f"${{{name}}} is required: {arg}")
        return arg if op in (":-", "-") else ""

    return _VAR.sub(one, text)


def interpolated(value: Any, env: dict[str, str]) -> Any:
    """``value`` with every string in it interpolated."""
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [interpolated(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolated(v, env) for k, v in value.items()}
    return value


def compose_raw() -> dict[str, Any]:
    """compose.yaml as written (variables not filled in)."""
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


def compose() -> dict[str, Any]:
    """compose.yaml with the variables of ``.env.example`` filled in."""
    data = interpolated(compose_raw(), read_env_file())
    assert isinstance(data, dict)
    return data


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object of ``deploy/kubernetes`` (the examples too), with its file."""
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path == KUSTOMIZATION:
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs.append((path, doc))
    return docs


def k8s_objects(kind: str) -> list[dict[str, Any]]:
    """The objects of one kind."""
    return [doc for _, doc in k8s_documents() if doc.get("kind") == kind]


@dataclass
class Container:
    """What one container runs, from either file."""

    where: str
    image: str
    argv: list[str]
    env: dict[str, str]
    #: exec probes and health checks: argv lists
    exec_probes: list[list[str]] = field(default_factory=list)
    #: httpGet probes: (path, port, scheme)
    http_probes: list[tuple[str, int | str, str]] = field(default_factory=list)
    #: tcpSocket probes: ports (numbers or names)
    tcp_probes: list[int | str] = field(default_factory=list)
    #: container port numbers by name (Kubernetes), or the published targets (Compose)
    ports: dict[str, int] = field(default_factory=dict)
    #: mount path -> read-only
    mounts: dict[str, bool] = field(default_factory=dict)
    #: the pod spec or the Compose service it belongs to
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str:
        """The node role a ``cxr-node`` command plays, else the image's name."""
        if self.argv[:2] == ["cxr-node", "serve"]:
            return "api" if self.env.get("CXR_NODE_API_ENABLED") == "true" else "receiver"
        if self.argv[:1] == ["cxr-node"]:
            return " ".join(a for a in self.argv[1:] if not a.startswith("-"))
        return "engine" if self.image.split(":")[0].endswith(ENGINE_IMAGE) else "other"


def dockerfile_lines(target: str) -> Iterator[str]:
    """The instructions of one stage of the Dockerfile (continuation lines joined)."""
    stage = None
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("FROM "):
            stage = line.split()[-1] if " AS " in line else None
        elif stage == target and line.strip() and not line.startswith("#"):
            yield line


def dockerfile_entrypoint_and_cmd(target: str) -> tuple[list[str], list[str]]:
    """The ``ENTRYPOINT`` and ``CMD`` (JSON form) of a Dockerfile stage."""
    entry: list[str] = []
    cmd: list[str] = []
    for line in dockerfile_lines(target):
        word, _, rest = line.partition(" ")
        if word == "ENTRYPOINT":
            entry = [str(a) for a in json.loads(rest)]
        elif word == "CMD":
            cmd = [str(a) for a in json.loads(rest)]
    return entry, cmd


def dockerfile_healthcheck(target: str) -> list[str] | None:
    """The ``HEALTHCHECK ... CMD [...]`` of a Dockerfile stage."""
    for line in dockerfile_lines(target):
        if line.startswith("HEALTHCHECK") and " CMD " in line:
            return [str(a) for a in json.loads(line.split(" CMD ", 1)[1])]
    return None


def _healthcheck_argv(test: Any) -> list[str] | None:
    if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
        return test[1:] if test[0] == "CMD" else shlex.split(test[1])
    if isinstance(test, str):
        return shlex.split(test)
    return None


def compose_containers() -> list[Container]:
    """Each service of compose.yaml built from deploy/compose/Dockerfile."""
    data = compose()
    found: list[Container] = []
    for name, svc in data["services"].items():
        build = svc.get("build")
        if not isinstance(build, dict) or not str(build.get("dockerfile", "")).endswith(
            "deploy/compose/Dockerfile"
        ):
            continue
        target = build.get("target", "node")
        entry, cmd = dockerfile_entrypoint_and_cmd(target)
        command = svc.get("command")  # replaces CMD, not ENTRYPOINT
        argv = [*entry, *(cmd if command is None else [str(a) for a in command])]
        env = {k: "" if v is None else str(v) for k, v in (svc.get("environment") or {}).items()}
        c = Container(f"compose.yaml services.{name}", svc["image"], argv, env, spec=svc)
        check = svc.get("healthcheck") or {}
        if not check.get("disable"):
            probe = _healthcheck_argv(check.get("test")) or dockerfile_healthcheck(target)
            if probe:
                c.exec_probes.append(probe)
        for port in svc.get("ports", []):
            target_port = str(port).rsplit(":", 1)[-1].split("/")[0]
            c.ports[f"published:{target_port}"] = int(target_port)
        for volume in svc.get("volumes", []):
            parts = str(volume).split(":")
            c.mounts[parts[1]] = len(parts) > 2 and "ro" in parts[2].split(",")
        found.append(c)
    return found


def _secret_values() -> dict[tuple[str, str], str]:
    values: dict[tuple[str, str], str] = {}
    for doc in k8s_objects("Secret"):
        for key, value in (doc.get("stringData") or {}).items():
            values[(doc["metadata"]["name"], key)] = str(value)
    return values


def _pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path, doc in k8s_documents():
        kind = doc.get("kind")
        if kind in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{path.name} {kind}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def k8s_pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every workload."""
    return list(_pod_specs())


def k8s_containers() -> list[Container]:
    """Each container of the Kubernetes workloads, its secret references filled in from the
    Secret templates."""
    secrets = _secret_values()
    found: list[Container] = []
    for where, pod in _pod_specs():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for spec in pod.get("containers", []) + pod.get("initContainers", []):
            argv = [str(a) for a in (spec.get("command") or []) + (spec.get("args") or [])]
            env: dict[str, str] = {}
            for item in spec.get("env", []):
                if "value" in item:
                    env[item["name"]] = str(item["value"])
                else:
                    ref = item["valueFrom"]["secretKeyRef"]
                    env[item["name"]] = secrets[(ref["name"], ref["key"])]
            c = Container(f"{where} container {spec['name']}", spec["image"], argv, env, spec=pod)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = spec.get(kind)
                if not probe:
                    continue
                if "exec" in probe:
                    c.exec_probes.append([str(a) for a in probe["exec"]["command"]])
                if "httpGet" in probe:
                    h = probe["httpGet"]
                    c.http_probes.append((h["path"], h["port"], h.get("scheme", "HTTP")))
                if "tcpSocket" in probe:
                    c.tcp_probes.append(probe["tcpSocket"]["port"])
            for port in spec.get("ports", []):
                c.ports[port.get("name", str(port["containerPort"]))] = int(port["containerPort"])
            for mount in spec.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                claim = volume.get("persistentVolumeClaim") or {}
                c.mounts[mount["mountPath"]] = bool(mount.get("readOnly") or claim.get("readOnly"))
            found.append(c)
    return found


def all_containers() -> list[Container]:
    """The containers of both files."""
    return compose_containers() + k8s_containers()


def configmap_toml() -> str:
    """The node's TOML configuration in the ConfigMap."""
    (doc,) = [d for d in k8s_objects("ConfigMap") if d["metadata"]["name"] == "cxr-node-config"]
    text = doc["data"]["cxr-node.toml"]
    assert isinstance(text, str)
    return text
