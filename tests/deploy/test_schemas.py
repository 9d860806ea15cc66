"""Every file of ``deploy/compose`` and ``deploy/kubernetes`` parses and meets its schema,
offline: the Compose Specification (vendored in ``tests/deploy/schemas``, see its README)
and the Kubernetes API schemas of :data:`manifests.KUBERNETES_VERSION` (bundled by the
``kubernetes-validate`` package), in strict mode (unknown fields are errors). Each
validator is first shown to reject a broken copy, so a schema that accepts anything would
fail here."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy import manifests as m

COMPOSE_SCHEMA = m.SCHEMAS / "compose-spec.json"
#: the vendored file, as recorded in tests/deploy/schemas/README.md
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"


def _compose_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator: jsonschema.Draft202012Validator, data: Any) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(data)
    ]


def test_vendored_compose_schema_is_the_recorded_one() -> None:
    digest = hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest()
    assert digest == COMPOSE_SCHEMA_SHA256, "update tests/deploy/schemas/README.md with it"
    readme = (m.SCHEMAS / "README.md").read_text(encoding="utf-8")
    assert COMPOSE_SCHEMA_SHA256 in readme
    assert (m.SCHEMAS / "LICENSE.compose-spec").is_file()


def test_compose_file_meets_the_compose_specification() -> None:
    validator = _compose_validator()
    # as written (variables unexpanded) and as Compose sees it with .env.example filled in
    assert _errors(validator, m.compose_raw()) == []
    assert _errors(validator, m.compose()) == []


def test_compose_schema_rejects_a_broken_file() -> None:
    validator = _compose_validator()
    broken = copy.deepcopy(m.compose())
    broken["services"]["receiver"]["helthcheck"] = broken["services"]["receiver"].pop("healthcheck")
    broken["services"]["worker"]["deploy"]["replicas"] = [2]
    errors = _errors(validator, broken)
    assert any("helthcheck" in e for e in errors), errors
    assert any("replicas" in e for e in errors), errors


def test_every_yaml_file_parses() -> None:
    files = sorted(m.DEPLOY.rglob("*.yaml")) + sorted(m.DEPLOY.rglob("*.yml"))
    assert m.COMPOSE_FILE in files and m.KUSTOMIZATION in files
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        assert docs and all(isinstance(d, dict) for d in docs if d is not None), path


def _k8s_ids() -> list[str]:
    return [f"{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in m.k8s_documents()]


@pytest.mark.parametrize(
    ("path", "doc"),
    [pytest.param(p, d, id=i) for (p, d), i in zip(m.k8s_documents(), _k8s_ids(), strict=True)],
)
def test_kubernetes_object_meets_the_api_schema(path: Path, doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, m.KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{path.name}: {doc['kind']} {where}: {exc.message}")


def test_kubernetes_schemas_reject_a_broken_object() -> None:
    (deployment,) = [d for d in m.k8s_objects("Deployment") if d["metadata"]["name"] == "receiver"]
    for mutate in ("unknown field", "wrong type"):
        broken = copy.deepcopy(deployment)
        container = broken["spec"]["template"]["spec"]["containers"][0]
        if mutate == "unknown field":
            container["livenesProbe"] = container.pop("livenessProbe")
        else:
            container["ports"][0]["containerPort"] = "eleven"
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, m.KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_examples() -> None:
    kustomization = m.load_yaml(m.KUSTOMIZATION)
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (m.K8S_DIR / name).is_file(), f"kustomization.yaml lists a missing {name}"
    files = {
        p.name
        for p in m.K8S_DIR.glob("*.yaml")
        if p != m.KUSTOMIZATION and not p.name.endswith(".example.yaml")
    }
    assert set(listed) == files
    namespace = kustomization["namespace"]
    assert [d["metadata"]["name"] for d in m.k8s_objects("Namespace")] == [namespace]
    for path, doc in m.k8s_documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{path.name} {doc['kind']}"
    images = {i["name"] for i in kustomization["images"]}
    for c in m.k8s_containers():
        assert c.image.split(":")[0] in images, c.where


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_builds_the_listed_objects() -> None:
    """``kubectl kustomize`` (offline) builds exactly the listed objects."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(m.K8S_DIR)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    built = sorted(
        (d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(out) if d is not None
    )
    listed = sorted(
        (d["kind"], d["metadata"]["name"])
        for p, d in m.k8s_documents()
        if not p.name.endswith(".example.yaml")
    )
    assert built == listed
