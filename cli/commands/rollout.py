"""`fieldline rollout`: create staged rollouts, watch their waves and nodes, pause, resume, abort."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fieldline.cli.admin_client import AdminError
from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin, labels
from fieldline.cli.output import console, fail, print_json, print_table

rollout_app = typer.Typer(
    no_args_is_help=True, help="Staged rollouts with health gates and automatic rollback."
)

WATCH_INTERVAL_S = 1.0
TERMINAL = ("succeeded", "rolled_back", "aborted")
STATE_STYLE = {
    "pending": "yellow",
    "running": "cyan",
    "paused": "magenta",
    "succeeded": "green",
    "rolled_back": "red",
    "aborted": "red",
    "waiting": "dim",
    "applying": "cyan",
    "applied": "cyan",
    "soaking": "blue",
    "healthy": "green",
    "passed": "green",
    "failed": "red",
}
HISTORY_SHOWN = 12


def _styled(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


@rollout_app.command("create")
def rollout_create(
    selector: Annotated[str, typer.Option(help="Label selector k=v[,k=v].")],
    artifact: Annotated[str | None, typer.Option(help="NAME@VERSION to roll out.")] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Policy file (YAML or JSON) to roll out.")
    ] = None,
    waves: Annotated[
        str, typer.Option(help="Cumulative wave sizes: counts or percentages.")
    ] = "1,10%,50%,100%",
    soak: Annotated[float, typer.Option(help="Seconds the gate must hold per wave.")] = 60.0,
    max_error_rate: Annotated[
        float | None, typer.Option(help="Highest error rate a node may show (0-1).")
    ] = 0.05,
    max_p95_ms: Annotated[
        float | None, typer.Option(help="Highest p95 latency a node may show, ms.")
    ] = None,
    require_loaded: Annotated[
        bool, typer.Option(help="The model must have loaded on every node of the wave.")
    ] = True,
    min_requests: Annotated[
        int, typer.Option(help="Requests a node must serve before its wave may pass.")
    ] = 0,
    on_failure: Annotated[
        str, typer.Option(help="pause (roll the wave back, wait) or rollback (roll back all).")
    ] = "pause",
    auto_rollback: Annotated[
        bool, typer.Option(help="Return a failing wave's nodes to their previous version.")
    ] = True,
    offline_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for an offline node before it counts failed.")
    ] = 600.0,
    apply_timeout: Annotated[
        float, typer.Option(help="Seconds an online node has to apply the new version.")
    ] = 1800.0,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a rollout of an artifact and/or a policy over the nodes a selector matches."""
    from fieldline.shared.policy import PolicyError, load_policy

    labels(selector)
    if artifact is None and policy is None:
        raise fail("give --artifact NAME@VERSION, --policy FILE, or both", 2)
    if on_failure not in ("pause", "rollback"):
        raise fail(f"--on-failure takes pause or rollback, not {on_failure!r}", 2)
    spec: dict[str, Any] = {
        "selector": selector,
        "waves": waves,
        "gate": {
            "soak_s": soak,
            "max_error_rate": max_error_rate,
            "max_p95_ms": max_p95_ms,
            "require_loaded": require_loaded,
            "min_requests": min_requests,
        },
        "on_failure": on_failure,
        "auto_rollback": auto_rollback,
        "offline_timeout_s": offline_timeout,
        "apply_timeout_s": apply_timeout,
    }
    if artifact:
        spec["artifact"] = artifact
    if policy is not None:
        try:
            spec["policy"] = load_policy(policy).model_dump(mode="json")
        except PolicyError as exc:
            raise fail(str(exc), 2) from exc
    with admin(url, key) as c:
        rollout = c.create_rollout(spec)
    if as_json:
        print_json(rollout)
        return
    sizes = ", ".join(str(w["size"]) for w in rollout["waves"])
    console.print(
        f"rollout {rollout['id']}: {rollout['artifact'] or ''}"
        f"{' policy ' + rollout['policy'] if rollout['policy'] else ''} to "
        f"{sum(w['size'] for w in rollout['waves'])} node(s) in waves of {sizes}"
    )
    console.print(f"watch it: fieldline rollout status {rollout['id']} --watch")


@rollout_app.command("list")
def rollout_list(
    state: Annotated[str | None, typer.Option(help="Only rollouts in this state.")] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List rollouts, newest first."""
    with admin(url, key) as c:
        rows = c.list_rollouts(state)
    if as_json:
        print_json(rows)
        return
    table_rows = [
        {
            **r,
            "what": " + ".join(
                x for x in (r["artifact"], r["policy"] and f"policy {r['policy']}") if x
            ),
            "progress": _progress_text(r),
        }
        for r in rows
    ]
    print_table(
        table_rows,
        [
            ("id", "rollout"),
            ("what", "what"),
            ("selector", "selector"),
            ("state", "state"),
            ("progress", "waves"),
            ("created", "created"),
            ("reason", "reason"),
        ],
        title="rollouts",
    )


def _progress_text(r: dict[str, Any]) -> str:
    done = sum(1 for w in r["waves"] if w["state"] == "passed")
    return f"{done}/{len(r['waves'])} passed, wave {r['wave']}"


def render(r: dict[str, Any]) -> Group:
    """The rich view of one rollout: header, waves with progress bars, nodes, history."""
    what = " + ".join(x for x in (r["artifact"], r["policy"] and f"policy {r['policy']}") if x)
    head = Text.assemble(
        ("rollout ", "bold"),
        (r["id"], "bold"),
        f"  {what}  selector {','.join(f'{k}={v}' for k, v in r['selector'].items()) or '(all)'}  ",
        _styled(r["state"]),
    )
    parts: list[Any] = [head]
    if r.get("reason"):
        parts.append(Text(r["reason"], style=STATE_STYLE.get(r["state"], "")))
    gate = r["spec"]["gate"]
    parts.append(
        Text(
            f"gate: soak {gate['soak_s']:g} s, max error rate {gate['max_error_rate']}, "
            f"max p95 {gate['max_p95_ms'] or '-'} ms, model loaded "
            f"{'required' if gate['require_loaded'] else 'not required'}; "
            f"on failure {r['spec']['on_failure']}",
            style="dim",
        )
    )
    waves = Table(title="waves", expand=False)
    for col in ("wave", "nodes", "state", "progress", "healthy", "failed"):
        waves.add_column(col)
    for w in r["waves"]:
        counts = w["counts"]
        healthy = counts.get("healthy", 0)
        waves.add_row(
            str(w["index"]),
            str(w["size"]),
            _styled(w["state"]),
            ProgressBar(total=max(w["size"], 1), completed=healthy, width=20),
            str(healthy),
            str(counts.get("failed", 0) + counts.get("rolled_back", 0)),
        )
    parts.append(waves)
    nodes = Table(title="nodes")
    for col in ("node", "wave", "state", "previous", "reason"):
        nodes.add_column(col)
    for n in r.get("nodes") or []:
        nodes.add_row(
            n["node_id"], str(n["wave"]), _styled(n["state"]), n["previous"] or "-", n["reason"]
        )
    parts.append(nodes)
    history = Table(title="history")
    for col in ("at", "state", "wave", "by", "reason"):
        history.add_column(col)
    for e in (r.get("history") or [])[-HISTORY_SHOWN:]:
        history.add_row(
            e["at"][11:19], _styled(e["state"]), str(e["wave"] or "-"), e["actor"], e["reason"]
        )
    parts.append(history)
    return Group(*parts)


@rollout_app.command("status")
def rollout_status(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until it ends (Ctrl-C to stop).")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a rollout's waves, nodes and history; --watch keeps it live until it ends.

    With --watch the exit code says how it ended: 0 succeeded, 1 rolled back or aborted.
    """
    with admin(url, key) as c:
        r = c.get_rollout(rollout_id)
        if as_json and not watch:
            print_json(r)
            return
        if not watch:
            console.print(render(r))
            return
        try:
            with Live(render(r), console=console, refresh_per_second=4) as live:
                while r["state"] not in TERMINAL:
                    time.sleep(WATCH_INTERVAL_S)
                    try:
                        r = c.get_rollout(rollout_id)
                    except AdminError as exc:  # a cloud restart: keep watching
                        if exc.status is not None:
                            raise
                        continue
                    live.update(render(r))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    if as_json:
        print_json(r)
    raise typer.Exit(0 if r["state"] == "succeeded" else 1)


def _action(
    action: str, rollout_id: str, reason: str, url: str, key: str | None, as_json: bool
) -> None:
    with admin(url, key) as c:
        r = c.rollout_action(rollout_id, action, reason)
    if as_json:
        print_json(r)
    else:
        console.print(
            f"rollout {r['id']}: {r['state']}" + (f" ({r['reason']})" if r["reason"] else "")
        )


ReasonOpt = Annotated[str, typer.Option(help="Why, for the rollout's history.")]


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    reason: ReasonOpt = "",
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Hold a rollout where it is (nodes keep what they run)."""
    _action("pause", rollout_id, reason, url, key, as_json)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    reason: ReasonOpt = "",
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Go on with a paused rollout; a wave that failed is tried again."""
    _action("resume", rollout_id, reason, url, key, as_json)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    reason: ReasonOpt = "",
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a rollout for good and return its nodes to their previous version."""
    _action("abort", rollout_id, reason, url, key, as_json)
