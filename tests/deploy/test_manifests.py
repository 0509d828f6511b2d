"""deploy/: the compose file against the Compose specification (vendored JSON schema), every
Kubernetes manifest with kubernetes-validate (offline, strict), the Dockerfiles' inputs, and the
example configs against the settings models. No Docker engine or cluster is needed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fieldline.shared.config import CloudSettings, EdgeSettings, load_settings
from fieldline.shared.policy import load_policy
from tests.deploy.kustomize_lite import render

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
K8S_VERSION = "1.30.0"
REQUIRED_SECRETS = ("FIELDLINE_ADMIN_KEY_FILE", "FIELDLINE_MQTT_PASSWORD_FILE")

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation (${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e},
    ${VAR:+a}, $VAR, $$), which `docker compose` applies before it validates the file."""

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        unset_or_empty = not value
        if op == ":-":
            return arg if unset_or_empty else value  # type: ignore[return-value]
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (unset_or_empty if op == ":?" else value is None):
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        if op == ":+":
            return "" if unset_or_empty else arg
        return value or ""

    return _VAR.sub(sub, text)


def compose_doc(env: dict[str, str]) -> dict[str, Any]:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env))  # type: ignore[no-any-return]


@pytest.fixture
def secret_env(tmp_path: Path) -> dict[str, str]:
    env = {}
    for name in REQUIRED_SECRETS:
        f = tmp_path / name.lower()
        f.write_text(os.urandom(32).hex())
        env[name] = str(f)
    return env


def test_compose_file_matches_the_compose_specification(secret_env: dict[str, str]) -> None:
    schema = json.loads(SCHEMA.read_text())
    doc = compose_doc(secret_env)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    services = doc["services"]
    assert {"mosquitto", "cloud", "edge-a", "edge-b", "line-simulator"} <= set(services)
    for name, svc in services.items():
        if name != "enroll":  # a one-shot job
            assert "healthcheck" in svc, f"{name} has no health check"
        build = svc.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (COMPOSE.parent / src).exists(), src
    assert (
        services["edge-a"]["depends_on"]["enroll"]["condition"] == "service_completed_successfully"
    )


def test_a_schema_violation_is_caught(secret_env: dict[str, str]) -> None:
    schema = json.loads(SCHEMA.read_text())
    doc = compose_doc(secret_env)
    doc["services"]["cloud"]["healthcheck"]["interval"] = {"not": "a duration"}
    doc["services"]["cloud"]["restrat"] = "always"
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(doc))) >= 2


@pytest.mark.parametrize("missing", REQUIRED_SECRETS)
def test_compose_fails_loudly_without_a_required_secret(
    secret_env: dict[str, str], missing: str
) -> None:
    env = {k: v for k, v in secret_env.items() if k != missing}
    with pytest.raises(InterpolationError, match=missing):
        compose_doc(env)
    with pytest.raises(InterpolationError, match=missing):
        compose_doc({**env, missing: ""})


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def test_every_kubernetes_manifest_validates() -> None:
    docs = _k8s_docs()
    assert len(docs) >= 7
    for path, doc in docs:
        if path.name.startswith("patch-"):
            continue  # partial by design: checked merged into the rendered overlay below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("target", ["base", "overlays/example"])
def test_kustomizations_render_to_valid_manifests(target: str) -> None:
    docs = render(DEPLOY / "k8s" / target, missing_files_ok=True)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Secret"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        labels = doc["metadata"].get("labels", {})
        if doc["kind"] != "Namespace":
            assert labels.get("app.kubernetes.io/part-of") == "fieldline", doc["metadata"]
            assert "app.kubernetes.io/name" in labels, doc["metadata"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    ports = {p["name"] for p in container["ports"]}
    service = next(
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "fieldline-cloud"
    )
    assert {"http", "grpc"} <= {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "fieldline-cloud-data"
    assert volumes["keys"]["secret"]["secretName"] == "fieldline-cloud-keys"
    assert mounts["data"] in container["args"]
    if target != "base":
        assert all(
            d["metadata"].get("namespace") == "fieldline" for d in docs if d["kind"] != "Namespace"
        )
        assert container["image"].endswith(":0.1.0") and "/" in container["image"]


def _dockerfile_lines(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.cloud", "Dockerfile.edge", "Dockerfile.edge-jetson"])
def test_dockerfiles_copy_what_exists_and_check_health(name: str) -> None:
    lines = _dockerfile_lines(DEPLOY / "docker" / name)
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"{name}: COPY {src} does not exist"
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert lines[-1].startswith('ENTRYPOINT ["fieldline"')


def test_jetson_image_installs_every_dependency_but_the_gpu_wheels() -> None:
    text = (DEPLOY / "docker" / "Dockerfile.edge-jetson").read_text()
    assert "requirements_without_gpu_wheels.py pyproject.toml" in text
    assert "l4t-jetpack" in text and "onnxruntime-gpu" in text and "--no-deps ." in text
    out = subprocess.run(
        [
            sys.executable,
            str(DEPLOY / "docker" / "requirements_without_gpu_wheels.py"),
            str(REPO / "pyproject.toml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(out) == {d for d in project if not re.match(r"^(torch|onnxruntime)\b", d)}
    assert not any(d.startswith(("torch", "onnxruntime")) for d in out)


def test_example_configs_load() -> None:
    ex = DEPLOY / "examples"
    edge = load_settings(EdgeSettings, ex / "edge.yaml")
    assert edge.mqtt is not None and edge.mqtt.tls and edge.mqtt.password_file
    assert edge.retention.max_bytes == 1024**3
    cloud = load_settings(CloudSettings, ex / "cloud.yaml")
    assert cloud.tls
    assert load_policy(ex / "policy-line-a.yaml").inspections
