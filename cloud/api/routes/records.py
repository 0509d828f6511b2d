"""/v1/records: what the edges ingested and decided, filtered and paged."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from fieldline.cloud.api.deps import ContextDep, ViewerKey
from fieldline.cloud.api.models import DeadRecordPage, DeadRecordPublic, RecordPage, RecordPublic
from fieldline.cloud.context import CloudContext
from fieldline.cloud.store import records as record_store
from fieldline.shared.limits import RECORD_KINDS

router = APIRouter(prefix="/v1/records", tags=["records"])
MAX_LIMIT = 1000
MAX_INT64 = 2**63 - 1  # SQLite's INTEGER range; larger numbers are refused with 422
KIND_PATTERN = f"^({'|'.join(sorted(RECORD_KINDS))})$"
# JSON nested deeper than this is returned as base64: parsing or serializing it recursively
# would raise RecursionError (a 500 for the whole fleet-wide page) or cost the stack.
MAX_JSON_DEPTH = 64


def _cursor(text: str | None) -> tuple[str, int, int] | None:
    """(node, epoch, seq) from "node:epoch:seq" (or an older page's "node:seq", epoch 0)."""
    if not text:
        return None
    head, sep, seq = text.rpartition(":")
    node, sep2, epoch = head.rpartition(":")
    if not sep2 or not epoch.isdigit():
        node, epoch = head, "0"
    if not sep or not node or not seq.isdigit() or max(int(seq), int(epoch)) > MAX_INT64:
        raise HTTPException(422, "cursor must be the next_cursor of a previous page")
    return node, int(epoch), int(seq)


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
        epoch=r.epoch,
        live=bool(r.live),
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
    dead: Annotated[
        bool, Query(description="The records the cloud refused (dead letters) instead")
    ] = False,
) -> RecordPage | DeadRecordPage:
    if dead:
        return _dead_page(ctx, node, cursor, limit)
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
    last = rows[-1] if len(rows) == limit else None
    next_cursor = f"{last.node_id}:{last.epoch}:{last.seq}" if last else None
    return RecordPage(records=[_public(r) for r in rows], next_cursor=next_cursor)


def _dead_page(
    ctx: CloudContext, node: str | None, cursor: str | None, limit: int
) -> DeadRecordPage:
    """A page of the cloud's dead letters; their cursor is the last one's id."""
    if cursor is not None and (not cursor.isdigit() or int(cursor) > MAX_INT64):
        raise HTTPException(422, "cursor must be the next_cursor of a previous page")
    rows = record_store.query_dead_records(
        ctx.db, node_id=node, after_id=int(cursor or 0), limit=limit
    )
    return DeadRecordPage(
        dead=[DeadRecordPublic(**asdict(r)) for r in rows],
        next_cursor=str(rows[-1].id) if len(rows) == limit else None,
    )
