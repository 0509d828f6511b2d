"""Readable rich panels of a node and its NodeHealth: `fieldline nodes show` and `fieldline
edge status` render through here, so a node looks the same from the cloud and on the box."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fieldline.shared.health import (
    DataPlaneHealth,
    GatewayHealth,
    LlmHealth,
    LocalRollback,
    ModelHealth,
    NodeHealth,
    TunnelHealth,
)
from fieldline.shared.schemas import ArtifactState, ArtifactStatus, NodeInfo

if TYPE_CHECKING:  # edge.status pulls in the edge store; the admin commands need not load it
    from fieldline.edge.status import EdgeStatus

Facts = Sequence[tuple[str, object]]
SHA_SHOWN = 12
STATE_STYLE = {"serving": "green", "loading": "yellow", "failed": "red", "none": "dim"}
ARTIFACT_STYLE = {
    ArtifactState.active: "green",
    ArtifactState.installed: "",
    ArtifactState.downloading: "yellow",
    ArtifactState.failed: "red",
}


class NodeView(BaseModel):
    """The CLI's reading of GET /v1/nodes/{id}: what `nodes show` renders."""

    model_config = ConfigDict(extra="ignore")

    id: str
    labels: dict[str, str] = Field(default_factory=dict)
    online: bool = False
    revoked_at: datetime | None = None
    last_seen: datetime | None = None
    health_at: datetime | None = None
    desired_generation: int = 0
    applied_generation: int = 0
    synced_seq: int = 0
    active: dict[str, str] = Field(default_factory=dict)
    artifacts: list[ArtifactStatus] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    node_info: NodeInfo = Field(default_factory=NodeInfo)
    health: NodeHealth | None = None


def text(value: object) -> str:
    """One value as a person reads it: yes/no, '-' for nothing, k=v lists, seconds-precise times."""
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def facts(rows: Facts) -> Table:
    """Label: value lines, labels dimmed; a row whose value is None (nothing to say) is left out."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    for label, value in rows:
        if value is not None:
            grid.add_row(label, value if isinstance(value, Text) else text(value))
    return grid


def panel(title: str, *body: RenderableType) -> Panel:
    return Panel(Group(*body), title=f"[bold]{title}[/bold]", title_align="left", expand=True)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _percent(rate: float) -> str:
    return f"{rate:.2%}"


def _yes_no(ok: bool, good: str = "yes", bad: str = "no") -> Text:
    return Text(good, style="green") if ok else Text(bad, style="red")


def artifacts_table(artifacts: Iterable[ArtifactStatus], active: dict[str, str]) -> Table:
    table = Table(title="artifacts", title_justify="left", expand=False)
    for col in ("name", "version", "state", "sha256", "error"):
        table.add_column(col)
    for a in artifacts:
        state = a.state.value + (" (running)" if active.get(a.name) == a.version else "")
        table.add_row(
            a.name,
            a.version,
            Text(state, style=ARTIFACT_STYLE.get(a.state, "")),
            a.sha256[:SHA_SHOWN],
            a.error or "-",
        )
    return table


def tunnel_panel(t: TunnelHealth) -> Panel:
    return panel(
        "tunnel",
        facts([("connected", _yes_no(t.connected)), ("round trip", _ms(t.rtt_ms))]),
    )


def dataplane_panel(dp: DataPlaneHealth) -> Panel:
    o, m = dp.outbox, dp.mqtt
    body: list[RenderableType] = [
        facts(
            [
                ("outbox", f"{o.rows} rows, {o.bytes} bytes, {o.unsynced} unsynced"),
                ("synced", f"seq {o.synced_seq} of {o.last_seq} (outbox epoch {o.epoch})"),
                ("sync backlog", f"{dp.sync_backlog} rows behind the live lane"),
                ("live lag", _ms(dp.sync_live_lag_ms)),
                ("dropped", o.dropped),
                ("dead letters", o.dead_letters),
                (
                    "mqtt",
                    _yes_no(m.connected, "connected", "disconnected")
                    if m.configured
                    else Text("not configured", style="dim"),
                ),
                ("mqtt stored", f"{m.stored} messages, {m.dead_lettered} dead-lettered"),
                ("verdicts", f"{dp.verdicts_published} published, {dp.defects} defects"),
            ]
        )
    ]
    if dp.inspection:
        table = Table(title="inspection models", title_justify="left")
        for col in ("model", "version", "loaded", "requests", "errors", "queue", "p95", "error"):
            table.add_column(col)
        for name, im in dp.inspection.items():
            table.add_row(
                name,
                im.version or "-",
                _yes_no(im.loaded),
                str(im.requests),
                str(im.errors),
                str(im.queue_depth),
                _ms(im.p95_latency_ms),
                im.error or "-",
            )
        body.append(table)
    return panel("data plane", *body)


def llm_panel(llm: LlmHealth) -> Panel:
    rows: list[tuple[str, object]] = [
        ("state", Text(llm.state, style=STATE_STYLE.get(llm.state, ""))),
        ("model", f"{llm.model}@{llm.version}" if llm.model else None),
        ("in flight", llm.inflight),
        ("retiring", llm.retiring),
        ("chat template", llm.chat_template),
        ("error", Text(llm.error, style="red") if llm.error else None),
    ]
    cfg = llm.engine_config
    if cfg is not None:
        rows.append(
            (
                "engine",
                f"{cfg.device} {cfg.dtype}, {cfg.attention_backend} attention, "
                f"{cfg.num_blocks or '?'} KV blocks of {cfg.block_size}, "
                f"max {cfg.max_num_seqs} seqs",
            )
        )
    return panel("LLM", facts(rows))


def gateway_panel(g: GatewayHealth) -> Panel:
    c = g.cache
    rows: list[tuple[str, object]] = [
        ("listening", f"port {g.listening}" if g.listening is not None else None),
        ("cache", f"{c.entries} entries, {c.hits} hits, {c.misses} misses"),
        ("explanations", g.explanations_published),
        ("error", Text(g.error, style="red") if g.error else None),
    ]
    if g.prefetch is not None:
        p = g.prefetch
        rows.append(
            ("last prefetch", f"{p.prompts_warmed} prompts, {p.prefixes_warmed} prefixes warmed")
        )
    return panel("gateway", facts(rows))


def models_panel(models: dict[str, ModelHealth]) -> Panel:
    table = Table(expand=False)
    for col in ("model", "version", "kind", "loaded", "requests", "error rate", "p95", "error"):
        table.add_column(col)
    for name, mh in models.items():
        table.add_row(
            name,
            mh.version or "-",
            mh.kind,
            _yes_no(mh.loaded),
            f"{mh.window_requests} in {mh.window_s:g} s ({mh.requests} total)",
            _percent(mh.error_rate),
            _ms(mh.p95_latency_ms),
            mh.error or "-",
        )
    return panel("models", table)


def rollbacks_panel(rollbacks: list[LocalRollback]) -> Panel:
    table = Table(expand=False)
    for col in ("model", "from", "to", "at", "reason"):
        table.add_column(col)
    for r in rollbacks:
        table.add_row(r.name, r.from_version, r.to_version, text(r.at), r.reason)
    return panel("local rollbacks", table)


def health_panels(health: NodeHealth | None) -> list[Panel]:
    """One panel per part the node runs; a part it does not run is left out."""
    if health is None:
        return [panel("health", Text("no health reported yet", style="dim"))]
    out: list[Panel] = []
    if health.tunnel is not None:
        out.append(tunnel_panel(health.tunnel))
    if health.dataplane is not None:
        out.append(dataplane_panel(health.dataplane))
    if health.llm is not None:
        out.append(llm_panel(health.llm))
    if health.gateway is not None:
        out.append(gateway_panel(health.gateway))
    if health.models:
        out.append(models_panel(health.models))
    if health.local_rollbacks:
        out.append(rollbacks_panel(health.local_rollbacks))
    if health.part_errors:
        out.append(
            panel(
                "part errors",
                facts([(k, Text(v, style="red")) for k, v in health.part_errors.items()]),
            )
        )
    return out


def reported_at(health: NodeHealth | None, stored_at: datetime | None) -> object:
    """When the health was measured (the node's clock), else when it was stored."""
    if health is None:
        return Text("never", style="yellow")
    return health.reported_at or stored_at


def node_state(node: NodeView) -> Text:
    if node.revoked_at is not None:
        return Text(f"revoked at {text(node.revoked_at)}", style="red")
    return _yes_no(node.online, "online", "offline")


def node_view(node: NodeView) -> Group:
    """`fieldline nodes show`: the node, its artifacts, then its health."""
    who = node.node_info.hostname or node.id
    body: list[RenderableType] = [
        facts(
            [
                ("id", node.id),
                ("state", node_state(node)),
                ("labels", node.labels),
                ("last seen", node.last_seen or Text("never", style="yellow")),
                ("health reported", reported_at(node.health, node.health_at)),
                ("generation", f"applied {node.applied_generation} of {node.desired_generation}"),
                ("active", ", ".join(f"{k}@{v}" for k, v in node.active.items()) or None),
                ("records synced", f"up to seq {node.synced_seq}"),
                ("agent", node.node_info.agent_version),
                ("platform", node.node_info.platform),
            ]
        )
    ]
    if node.artifacts:
        body.append(artifacts_table(node.artifacts, node.active))
    if node.errors:
        body.append(Text("\n".join(node.errors), style="red"))
    return Group(panel(f"node {who}", *body), *health_panels(node.health))


def edge_view(status: EdgeStatus) -> Group:
    """`fieldline edge status`: the node as its own store has it, then its health."""
    body: list[RenderableType] = [
        facts(
            [
                ("node id", status.node_id or Text("not enrolled", style="yellow")),
                ("cloud", status.cloud),
                ("labels", status.labels),
                ("cloud key", status.cloud_key_fingerprint),
                (
                    "generation",
                    f"applied {status.applied_generation} of {status.desired_generation}",
                ),
                ("active", ", ".join(f"{k}@{v}" for k, v in status.active.items()) or None),
                ("health reported", reported_at(status.health, status.health_at)),
            ]
        )
    ]
    if status.artifacts:
        body.append(artifacts_table(status.artifacts, status.active))
    if status.errors:
        body.append(Text("\n".join(status.errors), style="red"))
    if status.health_error:
        body.append(Text(status.health_error, style="red"))
    title = f"edge {status.node_id}" if status.node_id else "edge"
    return Group(panel(title, *body), *health_panels(status.health))
