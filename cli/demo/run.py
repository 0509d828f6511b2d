"""`fieldline demo`: a whole local stack in a temp dir, shown in a live view, gone when it ends.

A broker, a cloud and two edge daemons (separate processes), a simulated production line
publishing readings and camera frames, a defect classifier trained at start, quantized to
INT8 by the cloud and rolled out by label. Midway the tunnel is cut for a while: inspection
goes on at the edges, their outboxes fill, and drain when the tunnel returns. Line a also gets
a tiny random-weight LLM (int8): once edge-a serves it, one chat call goes through its gateway,
and its defect verdicts get explanations.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.live import Live

from fieldline.cli.admin_client import CA_ENV, AdminClient, AdminError
from fieldline.cli.demo.view import DemoEvents, EdgeSample, render
from fieldline.cli.harness.brokers import DemoBroker
from fieldline.cli.harness.processes import (
    ProcessError,
    ProcessStack,
    cloud_url,
    start_cloud,
    start_edge,
)
from fieldline.cli.harness.tcp_proxy import TcpProxy
from fieldline.cli.output import console, err_console
from fieldline.shared.health import DataPlaneHealth, EngineConfigReport, NodeHealth

REFRESH_S = 0.5
RATE_WINDOW_S = 3.0
TRAIN_SECONDS = 4.0
EDGES = (("edge-a", {"site": "plant1", "line": "a"}), ("edge-b", {"site": "plant1", "line": "b"}))
CUT_AT, RESTORE_AT = 0.35, 0.65  # shares of the duration
VERDICT_TOPIC = "plant1/line-{line}/verdicts"


def _policy(line: str, rule: dict[str, Any]) -> dict[str, Any]:
    """Each line's edge reads its own line's sensors and camera; line a also runs the LLM."""
    policy = {
        "name": f"line-{line}-inspection",
        "subscriptions": [{"topic": f"plant1/line-{line}/sensor/#", "kind": "telemetry"}],
        "inspections": [rule],
        "sync_interval_s": 1.0,
    }
    if line == "a":
        from fieldline.cli.demo.chat import EXPLAIN, llm_policy_fields

        policy |= llm_policy_fields()
        policy["inspections"] = [{**rule, "explain_template": EXPLAIN, "explain_max_tokens": 12}]
    return policy


def _cloud_records(url: str) -> int:
    ca = os.environ.get(CA_ENV)
    verify = ssl.create_default_context(cafile=ca) if ca else True
    text = httpx.get(f"{url}/metrics", timeout=5, verify=verify).text
    for line in text.splitlines():
        if line.startswith("fieldline_cloud_records_ingested_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _sample(edge_dir: Path) -> EdgeSample:
    from fieldline.edge.status import StatusError, read_status

    try:
        status = read_status(edge_dir)
    except StatusError:
        return EdgeSample()
    health = status.health or NodeHealth()
    dp = health.dataplane or DataPlaneHealth()
    return EdgeSample(
        inspections=sum(m.requests for m in dp.inspection.values()),
        defects=dp.defects,
        unsynced=dp.outbox.unsynced,
        lag=dp.outbox.last_seq - dp.outbox.synced_seq,
        tunnel=health.tunnel is not None and health.tunnel.connected,
    )


def run_demo(duration: float = 60.0, workdir: str | None = None) -> int:
    """Run the demo for `duration` seconds; returns the exit code."""
    keep = workdir is not None
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fieldline-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    events = DemoEvents()
    stop = {"now": False}

    def _on_signal(signum: int, frame: object) -> None:
        stop["now"] = True

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    broker: DemoBroker | None = None
    proxy: TcpProxy | None = None
    simulator = None
    code = 0
    try:
        with ProcessStack() as stack:
            console.print(f"[bold]fieldline demo[/bold] in {root} for {duration:.0f}s")
            broker = DemoBroker(root / "broker").start()
            events.add(f"MQTT broker: {broker.kind} on 127.0.0.1:{broker.port}")
            # TLS everywhere: HTTPS admin API, tokens that pin the minted CA, a mutual-TLS tunnel.
            _, ports = start_cloud(stack, root / "cloud", tls=True)
            os.environ[CA_ENV] = str(root / "cloud" / "tls" / "ca.crt")  # admin client, children
            key = (root / "cloud" / "admin.key").read_text().strip()
            url = cloud_url(root / "cloud", ports)
            proxy = TcpProxy(("127.0.0.1", ports["grpc"])).start()
            events.add(
                f"cloud: admin API {url} (TLS); edges enroll over TLS on port {ports['enroll']} "
                "and reach the mutual-TLS tunnel through a cuttable proxy"
            )
            simulator = _setup(root, url, key, broker, proxy, stack, events)
            converged = _watch(root, url, key, duration, events, proxy, stack, stop)
            simulator.stop()
            console.print()
            console.print("[bold]what happened[/bold]")
            for line in events.lines:
                console.print(line)
            console.print(
                f"line published {simulator.published} messages, {simulator.frames} frames "
                f"({simulator.defects_shown} defective); cloud holds {_cloud_records(url)} records"
            )
            console.print(
                "[green]every node applied its desired state[/green]"
                if converged
                else "[yellow]some nodes had not converged when the demo ended[/yellow]"
            )
            console.print("stopping the line, the edges, the cloud and the broker…")
    except (ProcessError, AdminError, RuntimeError) as exc:
        err_console.print(f"[red]demo failed:[/red] {exc}")
        code = 1
    finally:
        if simulator is not None:
            simulator.stop()
        if proxy is not None:
            proxy.stop()
        if broker is not None:
            broker.stop()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if not keep and code == 0 and not os.environ.get("FIELDLINE_DEMO_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
        elif code:
            err_console.print(f"logs kept in {root}")
    return code


def _setup(
    root: Path,
    url: str,
    key: str,
    broker: DemoBroker,
    proxy: TcpProxy,
    stack: ProcessStack,
    events: DemoEvents,
):  # type: ignore[no-untyped-def]
    """Train and push the model, apply the policy, enroll the edges, start the line."""
    from fieldline.cli.harness.classifier import train_classifier
    from fieldline.cli.harness.line_simulator import LineConfig, LineSimulator

    trained = train_classifier(root / "model", seconds_budget=TRAIN_SECONDS)
    events.add(
        f"trained the defect classifier in {trained.train_seconds:.1f}s "
        f"(held-out accuracy {trained.heldout_accuracy:.3f}), exported to ONNX"
    )
    with AdminClient(url, key) as admin:
        admin.push_artifact(trained.onnx_path, name="classifier", version="1.0-fp32", kind="onnx")
        cal = admin.push_artifact(
            trained.calibration_path, name="classifier-calibration", version="1.0", kind="file"
        )
        int8 = admin.quantize(
            "classifier",
            "1.0-fp32",
            target_version="1.0",
            calibration=f"{cal['name']}@{cal['version']}",
        )
        q = int8["metadata"]["quantization"]
        events.add(
            f"cloud quantized it to INT8: {q['int8_bytes']} vs {q['fp32_bytes']} bytes, "
            f"agreement {q['agreement']:.3f} on the calibration set"
        )
        from fieldline.cli.demo.chat import LLM_NAME, LLM_VERSION, push_demo_llm

        llm = push_demo_llm(admin, root)
        admin.assign(f"{LLM_NAME}@{LLM_VERSION}", "line=a")
        events.add(
            f"tiny LLM {LLM_NAME}@{LLM_VERSION} (random weights, tokenizer trained just now) "
            f"pushed as int8 ({llm['size']} bytes) and assigned to line=a"
        )
        for line in ("a", "b"):
            rule = trained.rule(
                name="parts",
                topic=f"plant1/line-{line}/camera/frames",
                model="classifier",
                result_topic=VERDICT_TOPIC.format(line=line),
            )
            admin.apply_policy(_policy(line, rule.model_dump(mode="json")), f"line={line}")
        admin.assign("classifier@1.0", "site=plant1")
        config = root / "line-a-settings.json"
        config.write_text('{"reject_threshold": 0.5}\n')
        admin.push_artifact(config, name="line-a-settings", version="1", kind="file")
        admin.assign("line-a-settings@1", "line=a")
        events.add("a policy per line; classifier@1.0 to site=plant1; line-a-settings@1 to line=a")
        env = {
            "FIELDLINE_MQTT__PORT": str(broker.port),
            "FIELDLINE_MQTT__PROTOCOL": broker.protocol,
            "FIELDLINE_HEARTBEAT_INTERVAL_S": "1",
            "FIELDLINE_RECONNECT__MAX_S": "2",
            "FIELDLINE_GATEWAY__PORT": "0",  # each edge's gateway on a free port
            "FIELDLINE_LLM__KV_CACHE_BYTES": str(16 * 1024 * 1024),
        }
        for name, labels in EDGES:
            token = admin.create_token(labels)["token"]
            start_edge(stack, root / name, proxy.port, token=token, name=name, env=env)
            events.add(
                f"{name} enrolling over TLS (CA pinned by its token) with "
                f"{','.join(f'{k}={v}' for k, v in labels.items())}"
            )
    sim = LineSimulator(
        LineConfig(port=broker.port, lines=("a", "b"), mqtt_v311=broker.protocol == "3.1.1")
    )
    sim.start()
    events.add("production line started: readings and camera frames, ~10% defective parts")
    return sim


class _LLMWatch:
    """Waits for edge-a to serve its LLM, then shows one chat call and its first explanation."""

    def __init__(self, edge_dir: Path) -> None:
        self.edge_dir = edge_dir
        self.chatted = False
        self.explained = False

    def step(self, events: DemoEvents) -> None:
        from fieldline.edge.status import StatusError, read_status

        if self.chatted and self.explained:
            return
        try:
            health = read_status(self.edge_dir).health
        except StatusError:
            return
        if health is None:
            return
        llm = health.llm
        if not self.chatted and llm is not None and llm.state == "serving":
            self.chatted = True
            cfg = llm.engine_config or EngineConfigReport()
            events.add(
                f"{self.edge_dir.name} serves {llm.model}@{llm.version}, autotuned: "
                f"{cfg.num_blocks} KV blocks, max_num_seqs {cfg.max_num_seqs}, "
                f"chunk {cfg.max_prefill_chunk}"
            )
            try:
                from fieldline.cli.demo.chat import chat_once

                for line in chat_once(self.edge_dir):
                    events.add(line)
            except (httpx.HTTPError, OSError, KeyError, ValueError) as exc:
                events.add(f"[red]chat through the gateway failed: {exc}[/red]")
        published = health.gateway.explanations_published if health.gateway else 0
        if not self.explained and published:
            self.explained = True
            events.add(
                f"{self.edge_dir.name} explains defect verdicts with the LLM on "
                "plant1/line-a/verdicts/explanations (after each verdict, never before it)"
            )


def _watch(
    root: Path,
    url: str,
    key: str,
    duration: float,
    events: DemoEvents,
    proxy: TcpProxy,
    stack: ProcessStack,
    stop: dict[str, bool],
) -> bool:
    """The live view until the duration ends; cuts and restores the tunnel midway."""
    t0 = time.monotonic()
    cut = restored = False
    llm = _LLMWatch(root / EDGES[0][0])
    history: dict[str, list[tuple[float, int]]] = {name: [] for name, _ in EDGES}
    with AdminClient(url, key) as admin, Live(console=console, refresh_per_second=4) as live:
        while not stop["now"]:
            elapsed = time.monotonic() - t0
            if elapsed >= duration:
                break
            for child in stack.children:
                child.check_alive()
            if not cut and elapsed >= duration * CUT_AT:
                proxy.cut()
                cut = True
                events.add(
                    "[red]tunnel cut[/red]: edges keep inspecting; outboxes hold the records"
                )
            if cut and not restored and elapsed >= duration * RESTORE_AT:
                proxy.restore()
                restored = True
                events.add("[green]tunnel restored[/green]: outboxes drain into the cloud")
            llm.step(events)
            samples = {name: _sample(root / name) for name, _ in EDGES}
            now = time.monotonic()
            for name, s in samples.items():
                # Edges report once per heartbeat: rate over a few seconds, not one refresh.
                h = [x for x in history[name] if now - x[0] <= RATE_WINDOW_S]
                h.append((now, s.inspections))
                history[name] = h
                s.rate = (h[-1][1] - h[0][1]) / (h[-1][0] - h[0][0]) if len(h) > 1 else 0.0
            try:
                nodes = admin.list_nodes()
                records = _cloud_records(url)
            except (AdminError, httpx.HTTPError) as exc:
                events.add(f"[red]{exc}[/red]")
                nodes, records = [], 0
            live.update(render(nodes, samples, records, events, duration - elapsed))
            time.sleep(REFRESH_S)
        final = admin.list_nodes()
    return all(n["desired_generation"] == n["applied_generation"] for n in final)
