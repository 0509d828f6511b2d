"""/v1/records: what the edges ingested and decided, filtered and paged."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from fieldline.cloud.api.deps import ContextDep, ViewerKey
from fieldline.cloud.api.models import RecordPage, RecordPublic
from fieldline.cloud.store import records as record_store
from fieldline.shared.limits import RECORD_KINDS

router = APIRouter(prefix="/v1/records", tags=["records"])
MAX_LIMIT = 1000
MAX_INT64 = 2**63 - 1  # SQLite's INTEGER range; larger numbers are refused with 422
KIND_PATTERN = f"^({'|'.join(sorted(RECORD_KINDS))})$"
# JSON nested deeper than this is returned as base64: parsing or serializing it recursively
# would raise RecursionError (a 500 for the whole fleet-wide page) or cost the stack.
MAX_JSON_DEPTH = 64


def _cursor(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    node, sep, seq = text.rpartition(":")
    if not sep or not seq.isdigit() or int(seq) > MAX_INT64:
        raise HTTPException(422, "cursor must be the next_cursor of a previous page")
    return node, int(seq)


def _json_or_none(raw: bytes) -> object | None:
    """The payload parsed, or None when it is not JSON or nests deeper than MAX_JSON_DEPTH."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return value  # cannot nest deeper than it has brackets
    stack: list[tuple[object, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:  # iterative: the depth check itself must not recurse
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return None
        children: Iterable[object] = node.values() if isinstance(node, dict) else node  # type: ignore[assignment]
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return value


def _public(r: record_store.RecordRow) -> RecordPublic:
    """The API's record, built from the store's row (the only place one becomes the other)."""
    parsed = _json_or_none(r.payload)
    payload, enc = (
        (parsed, "json")
        if parsed is not None or r.payload.strip() == b"null"
        else (base64.b64encode(r.payload).decode(), "base64")
    )
    return RecordPublic(
        node_id=r.node_id,
        seq=r.seq,
        kind=r.kind,
        topic=r.topic,
        ts_ms=r.ts_ms,
        received_ms=r.received_ms,
        payload=payload,
        payload_encoding=enc,
    )


@router.get("")
def list_records(
    ctx: ContextDep,
    _: ViewerKey,
    node: str | None = None,
    kind: Annotated[str | None, Query(pattern=KIND_PATTERN)] = None,
    topic: str | None = None,
    since_ms: Annotated[int | None, Query(ge=-MAX_INT64, le=MAX_INT64)] = None,
    until_ms: Annotated[int | None, Query(ge=-MAX_INT64, le=MAX_INT64)] = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> RecordPage:
    rows = record_store.query_records(
        ctx.db,
        node_id=node,
        kind=kind,
        topic=topic,
        since_ms=since_ms,
        until_ms=until_ms,
        after=_cursor(cursor),
        limit=limit,
    )
    next_cursor = f"{rows[-1].node_id}:{rows[-1].seq}" if len(rows) == limit else None
    return RecordPage(records=[_public(r) for r in rows], next_cursor=next_cursor)
