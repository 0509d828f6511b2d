"""The demo's live view: the fleet as the cloud sees it and the data plane as each edge sees it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

EDGE_DIR_OF_LINE = {"a": "edge-a", "b": "edge-b"}


@dataclass
class EdgeSample:
    inspections: int = 0
    defects: int = 0
    unsynced: int = 0
    lag: int = 0
    tunnel: bool = False
    rate: float = 0.0


@dataclass
class DemoEvents:
    t0: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.lines.append(f"[dim]{time.monotonic() - self.t0:5.1f}s[/dim] {text}")


def render(
    nodes: list[dict[str, Any]],
    samples: dict[str, EdgeSample],
    cloud_records: int,
    events: DemoEvents,
    left_s: float,
) -> Group:
    table = Table(title=f"fleet — cloud holds {cloud_records} records", expand=True)
    for header in ("edge", "online", "gen", "active", "insp/s", "defects", "outbox", "sync lag"):
        table.add_column(header)
    for n in sorted(nodes, key=lambda n: n.get("labels", {}).get("line", "")):
        edge = EDGE_DIR_OF_LINE.get(n.get("labels", {}).get("line", ""), "?")
        s = samples.get(edge, EdgeSample())
        converged = n.get("desired_generation") == n.get("applied_generation")
        active = n.get("active") or {}
        table.add_row(
            f"{edge} ({n['id'][-6:]})",
            "[green]yes[/green]" if n.get("online") else "[red]no[/red]",
            ("[green]" if converged else "[yellow]")
            + f"{n.get('applied_generation')}/{n.get('desired_generation')}[/]",
            ", ".join(f"{k}@{v}" for k, v in active.items()) or "-",
            f"{s.rate:.1f}",
            str(s.defects),
            str(s.unsynced),
            ("[yellow]" if s.lag > 100 else "") + str(s.lag),
        )
    log = "\n".join(events.lines[-9:])
    return Group(table, Panel(log, title=f"demo — {left_s:4.0f}s left (Ctrl-C stops)"))
