"""Hostile input for the admin API: schemathesis drives every operation of the OpenAPI document
with generated valid and invalid requests, with an admin key, lesser keys, a wrong key and no key,
against a real cloud process. No answer may be a 5xx, and no request may succeed without the
role its route needs (the role of each route is read from the app itself)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from fieldline.cli.harness.processes import ProcessStack, start_cloud
from fieldline.cloud.api.app import create_app
from fieldline.cloud.context import open_context
from fieldline.cloud.store.auth import Role
from fieldline.shared.config import CloudSettings

# Examples per operation and generation mode; the slow run uses many more.
QUICK_EXAMPLES = int(os.environ.get("FIELDLINE_SCHEMATHESIS_EXAMPLES", "8"))
SLOW_EXAMPLES = 150
# Routes that need no key: probes, metrics, the API document, and the dashboard page (its data
# comes from /v1 routes with the key the user types in).
PUBLIC = {"/", "/healthz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@dataclass
class Api:
    url: str
    keys: dict[str, str]  # role name -> key
    roles: dict[tuple[str, str], Role]  # (METHOD, path template) -> role needed


def route_roles(tmp: Path) -> dict[tuple[str, str], Role]:
    """Each route's required role, found in its dependencies (deps.require marks them)."""
    ctx = open_context(CloudSettings(data_dir=tmp))
    try:
        app = create_app(ctx)
    finally:
        ctx.close()
    roles: dict[tuple[str, str], Role] = {}
    routes = list(app.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # newer FastAPI wraps routers
        if included is not None:
            routes.extend(included.routes)
            continue
        if not isinstance(route, APIRoute):
            continue
        stack = list(route.dependant.dependencies)
        found = None
        while stack:
            dep = stack.pop()
            found = getattr(dep.call, "required_role", None) or found
            stack.extend(dep.dependencies)
        for method in route.methods:
            if found is None:
                assert route.path in PUBLIC, f"{method} {route.path} checks no role"
            else:
                roles[(method, route.path)] = found
    return roles


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("hostile")
    roles = route_roles(root / "roles")
    with ProcessStack() as stack:
        _, ports = start_cloud(
            stack, root / "cloud", env={"FIELDLINE_MAX_ARTIFACT_BYTES": str(64 * 1024)}
        )
        url = f"http://127.0.0.1:{ports['http']}"
        admin = (root / "cloud" / "admin.key").read_text().strip()
        keys = {"admin": admin}
        for role in ("operator", "viewer"):
            r = httpx.post(
                f"{url}/v1/keys",
                json={"role": role},
                headers={"Authorization": f"Bearer {admin}"},
                timeout=30,
            )
            keys[role] = r.json()["key"]
        yield Api(url, keys, roles)


def _operations(api: Api) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    documented = {(op.method.upper(), op.path) for op in ops}
    assert documented == set(api.roles) | {(m, p) for m, p in documented if p in PUBLIC}, (
        "the OpenAPI document and the app's routes differ"
    )
    return ops


def _call(api: Api, who: str, key: str | None, needed: Role | None, case: schemathesis.Case) -> int:
    """Send one generated request as `who` and apply the two rules; returns the status."""
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    case.headers = headers
    r = case.call(base_url=api.url, timeout=60)
    where = f"{who} {case.method} {case.formatted_path}: {r.status_code} {r.text[:300]}"
    assert r.status_code < 500, where
    rank = Role(who).rank if who in api.keys else -1
    if needed is not None and rank < needed.rank:
        assert r.status_code >= 400, f"accepted without the {needed} role: {where}"
        if key is None or who == "wrong":
            # 400/422: a body FastAPI cannot parse is refused before the key is read
            assert r.status_code in (400, 401, 422), where
    return int(r.status_code)


def _driver(
    api: Api, who: str, key: str | None, needed: Role | None, count: Callable[[int], None]
) -> Callable[[schemathesis.Case], None]:
    def drive(case: schemathesis.Case) -> None:
        count(_call(api, who, key, needed, case))

    return drive


def _run(api: Api, who: str, examples: int, modes: list[GenerationMode]) -> dict[str, int]:
    """Drive every operation as `who` in each mode; returns status counts."""
    key = api.keys.get(who, "flk_not-a-key-at-all" if who == "wrong" else None)
    counts: dict[str, int] = {}

    def count(status: int) -> None:
        bucket = f"{status // 100}xx"
        counts[bucket] = counts.get(bucket, 0) + 1

    for op in _operations(api):
        needed = api.roles.get((op.method.upper(), op.path))
        inputs = sum(
            len(getattr(op, part)) for part in ("path_parameters", "query", "headers", "body")
        )
        for mode in modes if inputs else [m for m in modes if m != GenerationMode.NEGATIVE]:
            drive = given(case=op.as_strategy(generation_mode=mode))(
                _driver(api, who, key, needed, count)
            )
            drive = settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )(drive)
            drive()
    return counts


WHO = ["admin", "operator", "viewer", "wrong", "none"]


@pytest.mark.parametrize("who", WHO)
def test_schemathesis_no_5xx_and_no_missing_role(api: Api, who: str) -> None:
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    counts = _run(api, who, QUICK_EXAMPLES, modes)
    assert sum(counts.values()) > 0
    if who in ("wrong", "none"):
        assert counts.get("2xx", 0) <= 2 * QUICK_EXAMPLES * 2  # only the public routes


@pytest.mark.slow
@pytest.mark.parametrize("who", WHO)
def test_schemathesis_long_run(api: Api, who: str) -> None:
    counts = _run(api, who, SLOW_EXAMPLES, [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    print(f"schemathesis {who}: {counts}")
