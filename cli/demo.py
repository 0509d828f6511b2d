"""`fieldline demo`: a whole local stack in a temp dir, shown in a live view, gone when it ends.

A cloud and two edge daemons run as separate processes; the edges enroll with different
labels; a small artifact is pushed and assigned to one label, then a second version to all.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from fieldline.cli.admin_client import AdminClient, AdminError
from fieldline.cli.output import console, err_console
from fieldline.cli.processes import ProcessError, ProcessStack, start_cloud, start_edge

REFRESH_S = 0.5
DEMO_ARTIFACT_BYTES = 4 * 1024 * 1024
EDGES = (("edge-a", "site=plant1,line=a"), ("edge-b", "site=plant1,line=b"))


@dataclass
class DemoEvent:
    at_s: float
    text: str


def _make_artifact(path: Path, size: int) -> Path:
    path.write_bytes(secrets.token_bytes(size))
    return path


def _nodes_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table(title="fleet", expand=True)
    for header in ("node", "labels", "online", "desired", "applied", "active", "last seen"):
        table.add_column(header)
    for n in sorted(nodes, key=lambda n: str(n.get("labels"))):
        active = n.get("active") or {}
        converged = n.get("desired_generation") == n.get("applied_generation")
        table.add_row(
            n["id"],
            ",".join(f"{k}={v}" for k, v in (n.get("labels") or {}).items()),
            "[green]yes[/green]" if n.get("online") else "[red]no[/red]",
            str(n.get("desired_generation")),
            ("[green]" if converged else "[yellow]") + str(n.get("applied_generation")) + "[/]",
            ", ".join(f"{k}@{v}" for k, v in active.items()) or "-",
            str(n.get("last_seen") or "-")[11:19],
        )
    return table


def _view(nodes: list[dict[str, Any]], events: list[DemoEvent], left_s: float) -> Group:
    log = "\n".join(f"[dim]{e.at_s:5.1f}s[/dim] {e.text}" for e in events[-8:])
    return Group(
        _nodes_table(nodes),
        Panel(log or "starting…", title=f"demo — {left_s:4.0f}s left (Ctrl-C stops)"),
    )


def run_demo(duration: float = 60.0, workdir: str | None = None) -> int:
    """Run the demo for `duration` seconds; returns the exit code."""
    keep = workdir is not None
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fieldline-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    events: list[DemoEvent] = []
    t0 = time.monotonic()

    def note(text: str) -> None:
        events.append(DemoEvent(time.monotonic() - t0, text))

    # Ctrl-C and SIGTERM end the demo the same way: the stack below is stopped in reverse.
    stop = {"now": False}

    def _on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    old_term = signal.signal(signal.SIGTERM, _on_signal)
    old_int = signal.signal(signal.SIGINT, _on_signal)
    code = 0
    try:
        with ProcessStack() as stack:
            console.print(f"[bold]fieldline demo[/bold] in {root} for {duration:.0f}s")
            _cloud, ports = start_cloud(stack, root / "cloud")
            key = (root / "cloud" / "admin.key").read_text().strip()
            url = f"http://127.0.0.1:{ports['http']}"
            note(f"cloud up: admin API {url}, tunnel 127.0.0.1:{ports['grpc']}")
            with AdminClient(url, key) as admin:
                for name, labels in EDGES:
                    token = admin.create_token(dict(kv.split("=") for kv in labels.split(",")))
                    start_edge(stack, root / name, ports["grpc"], token=token["token"], name=name)
                    note(f"{name} started with a token for {labels}")
                artifact = _make_artifact(root / "detector.bin", DEMO_ARTIFACT_BYTES)
                m1 = admin.push_artifact(artifact, name="detector", version="1.0", kind="file")
                note(f"pushed detector@1.0 ({m1['size']} bytes, sha256 {m1['sha256'][:12]}…)")
                admin.assign("detector@1.0", "line=a")
                note("assigned detector@1.0 to line=a")
                second_done = False
                with Live(console=console, refresh_per_second=4, transient=False) as live:
                    while not stop["now"]:
                        elapsed = time.monotonic() - t0
                        if elapsed >= duration:
                            break
                        for child in stack.children:
                            child.check_alive()
                        if not second_done and elapsed >= duration / 2:
                            _make_artifact(artifact, DEMO_ARTIFACT_BYTES)
                            admin.push_artifact(
                                artifact, name="detector", version="1.1", kind="file"
                            )
                            admin.assign("detector@1.1", "site=plant1")
                            note("pushed detector@1.1 and assigned it to site=plant1 (both lines)")
                            second_done = True
                        try:
                            nodes = admin.list_nodes()
                        except AdminError as exc:
                            note(f"[red]{exc}[/red]")
                            nodes = []
                        live.update(_view(nodes, events, duration - elapsed))
                        time.sleep(REFRESH_S)
                final = admin.list_nodes()
            converged = all(n["desired_generation"] == n["applied_generation"] for n in final)
            console.print(
                "[green]every node applied its desired state[/green]"
                if converged
                else "[yellow]some nodes had not converged when the demo ended[/yellow]"
            )
            console.print("stopping edges and cloud…")
    except (ProcessError, AdminError) as exc:
        err_console.print(f"[red]demo failed:[/red] {exc}")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        if not keep and code == 0 and not os.environ.get("FIELDLINE_DEMO_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
        elif code:
            err_console.print(f"logs kept in {root}")
    return code
