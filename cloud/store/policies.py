"""Policies applied to label selectors; the newest matching one is a node's active policy."""

from __future__ import annotations

import json
from typing import Any

from fieldline.cloud.store.db import Database
from fieldline.shared.clock import utcnow
from fieldline.shared.schemas import selector_matches


def add_policy(
    db: Database, *, name: str, document: dict[str, Any], selector: dict[str, str]
) -> int:
    with db.write() as d:
        table = d["policies"]
        table.insert(
            {
                "name": name,
                "document": json.dumps(document, sort_keys=True),
                "selector": json.dumps(selector),
                "created": utcnow().isoformat(),
            }
        )
        return int(table.last_pk)  # type: ignore[arg-type]


def policy_for(db: Database, *, labels: dict[str, str]) -> dict[str, Any] | None:
    with db.read() as d:
        rows = list(d["policies"].rows_where(order_by="id desc"))
    for r in rows:
        if selector_matches(json.loads(r["selector"]), labels):
            doc: dict[str, Any] = json.loads(r["document"])
            return doc
    return None
