"""A small Kustomize renderer for the tests (no kubectl here): resources, namespace, labels,
images, secretGenerator and strategic-merge patches, the subset deploy/k8s uses.

It refuses any kustomization field it does not implement, so the manifests cannot quietly
grow beyond what the tests check.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "secretGenerator",
    "patches",
}
CLUSTER_SCOPED = {"Namespace"}


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as Kubernetes does it for these kinds: maps merge, lists of maps with a
    `name` merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out_list = [copy.deepcopy(x) for x in base]
        for item in patch:
            for i, existing in enumerate(out_list):
                if existing["name"] == item["name"]:
                    out_list[i] = _merge(existing, item)
                    break
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def render(directory: Path, *, missing_files_ok: bool = False) -> list[dict[str, Any]]:
    """The documents `kubectl kustomize directory` would print (for this subset)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomization fields not supported here: {unknown}")
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = directory / res
        docs += (
            render(path, missing_files_ok=missing_files_ok) if path.is_dir() else _load_all(path)
        )
    for gen in k.get("secretGenerator", []):
        data = {}
        for entry in gen.get("files", []):
            key, _, name = entry.partition("=")
            source = directory / (name or key)
            if source.exists():
                data[key] = base64.b64encode(source.read_bytes()).decode()
            elif missing_files_ok:
                data[key] = base64.b64encode(b"generated-from-a-file-not-in-git").decode()
            else:
                raise FileNotFoundError(source)
        for entry in gen.get("literals", []):
            key, _, value = entry.partition("=")
            data[key] = base64.b64encode(value.encode()).decode()
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": gen["name"]},
            "data": data,
        }
        if gen.get("behavior") == "replace":
            old = next(
                d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == gen["name"]
            )
            secret["metadata"] = old["metadata"]
            secret["type"] = old.get("type", "Opaque")
            docs[docs.index(old)] = secret
        else:
            docs.append(secret)
    for patch in k.get("patches", []):
        for p in _load_all(directory / patch["path"]):
            target = next(
                d
                for d in docs
                if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]
            )
            docs[docs.index(target)] = _merge(target, p)
    for lab in k.get("labels", []):
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(lab["pairs"])
    for img in k.get("images", []):
        for d in docs:
            for c in _containers(d):
                name, _, tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}"
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]
    return docs
