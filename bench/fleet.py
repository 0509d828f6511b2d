"""Fleet scale: N lightweight edge clients (bench/_fleet_client.py, several processes, one gRPC
connection per node) against one real `fieldline cloud serve` process.

Prints JSON lines (see DESIGN.md, Benchmark output):
- tunnels: control streams connected at once (baseline: the number asked for);
- heartbeat_rtt_p95: heartbeat round trip p95 with every tunnel up (baseline: one tunnel alone);
- controller_rss: the cloud process's resident memory after the rollout (baseline: the idle
  controller before any node); controller_cpu: its CPU share while the fleet beats (baseline:
  while one tunnel beats);
- rollout_converge: a staged rollout of a 1 MiB artifact over R nodes in 5 waves, from the POST to
  `succeeded` (baseline: a plain assignment of a 1 MiB artifact to the same nodes, until all
  applied it).
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from fieldline.cli.admin_client import AdminClient
from fieldline.cli.harness.processes import ProcessStack, start_cloud
from fieldline.shared.health import p95 as health_p95

CLIENT = Path(__file__).resolve().with_name("_fleet_client.py")
CONNECT_TIMEOUT_S = 600.0
CONVERGE_TIMEOUT_S = 600.0
WAVES = "1,10%,25%,50%,100%"
ARTIFACT_BYTES = 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[fleet] {msg}", file=sys.stderr, flush=True)


def rss_mib(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICKS


def p95(values: list[float]) -> float:
    """shared/health.py's p95 (the one the gates read); NaN for no samples."""
    found = health_p95(values)
    return float("nan") if found is None else found


class Clients:
    """The client processes; each gets a share of the tokens."""

    def __init__(self, root: Path, grpc_target: str, heartbeat_s: float):
        self.root = root
        self.target = grpc_target
        self.heartbeat_s = heartbeat_s
        self.procs: list[tuple[subprocess.Popen[str], Path]] = []

    def start(self, tokens: list[str], processes: int) -> None:
        shares = [tokens[i::processes] for i in range(processes)]
        for share in shares:
            if not share:
                continue
            k = len(self.procs)
            token_file = self.root / f"tokens-{k}.json"
            token_file.write_text(json.dumps(share))
            out = self.root / f"samples-{k}.json"
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(CLIENT),
                    "--cloud",
                    self.target,
                    "--tokens",
                    str(token_file),
                    "--out",
                    str(out),
                    "--heartbeat-s",
                    str(self.heartbeat_s),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.procs.append((proc, out))

    def wait_ready(self) -> None:
        for proc, _ in self.procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                raise RuntimeError(f"client {proc.pid} exited with {proc.wait()} before ready")

    def stop(self) -> dict[str, list]:
        merged: dict[str, list] = {"rtts": [], "applied": [], "errors": []}
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, out in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                data = json.loads(out.read_text())
                for key in merged:
                    merged[key].extend(data[key])
        self.procs.clear()
        return merged


def make_tokens(admin: AdminClient, n: int, labels_of: list[dict[str, str]]) -> list[str]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda labels: admin.create_token(labels)["token"], labels_of[:n]))


def push(admin: AdminClient, root: Path, name: str, version: str, kind: str) -> dict:
    path = root / f"{name}-{version}.bin"
    path.write_bytes(secrets.token_bytes(ARTIFACT_BYTES))
    return admin.push_artifact(path, name=name, version=version, kind=kind)


def emit(
    metric: str, unit: str, value: float, baseline: float, speedup: float, **cond: object
) -> None:
    print(
        json.dumps(
            {
                "bench": "fleet",
                "metric": metric,
                "unit": unit,
                "value": round(value, 3),
                "baseline": round(baseline, 3),
                "speedup": round(speedup, 3),
                **cond,
            }
        ),
        flush=True,
    )


# Every simulated gateway dials from 127.0.0.1, so the cloud's per-address enrollment rate limit
# (meant for one real address) is lifted here; the tunnels and heartbeats are what is measured.
CLOUD_ENV = {
    "FIELDLINE_LOG_LEVEL": "warning",
    "FIELDLINE_ENROLL_RATE_PER_S": "100000",
    "FIELDLINE_ENROLL_BURST": "100000",
    "FIELDLINE_ENROLL_GLOBAL_RATE_PER_S": "100000",
}


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="fieldline-fleet-") as tmp, ProcessStack() as stack:
        root = Path(tmp)
        cloud, ports = start_cloud(stack, root / "cloud", env=CLOUD_ENV)
        key = (root / "cloud" / "admin.key").read_text().strip()
        url = f"http://127.0.0.1:{ports['http']}"
        target = f"127.0.0.1:{ports['grpc']}"
        admin = AdminClient(url, key, timeout=120)
        time.sleep(1.0)
        idle_rss, _ = rss_mib(cloud.pid)
        cond = {
            "nodes": args.nodes,
            "client_processes": args.processes,
            "heartbeat_s": args.heartbeat_s,
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }

        # Baseline heartbeat round trip: one tunnel, idle controller.
        solo_tokens = make_tokens(admin, 1, [{"group": "solo"}])
        solo = Clients(root / "solo", target, 1.0)
        (root / "solo").mkdir()
        solo.start(solo_tokens, 1)
        solo.wait_ready()
        s0, sc0 = time.time(), cpu_s(cloud.pid)
        time.sleep(args.baseline_s)
        solo_cpu = 100 * (cpu_s(cloud.pid) - sc0) / (time.time() - s0)
        solo_rtt = p95([ms for _, ms in solo.stop()["rtts"]])
        log(f"one tunnel: heartbeat p95 {solo_rtt:.1f} ms")

        labels = [
            {"group": "rollout" if i < args.rollout_nodes else "rest"} for i in range(args.nodes)
        ]
        log(f"minting {args.nodes} enrollment tokens")
        tokens = make_tokens(admin, args.nodes, labels)
        clients = Clients(root, target, args.heartbeat_s)
        started = time.monotonic()
        log(f"starting {args.nodes} clients in {args.processes} processes")
        clients.start(tokens, args.processes)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        connected = 0
        while time.monotonic() < deadline:
            connected = int(httpx.get(f"{url}/healthz", timeout=30).json()["tunnels"])
            log(f"tunnels connected: {connected}/{args.nodes}")
            if connected >= args.nodes:
                break
            time.sleep(2.0)
        clients.wait_ready()
        connect_s = time.monotonic() - started
        connected = int(httpx.get(f"{url}/healthz", timeout=30).json()["tunnels"])
        emit(
            "tunnels",
            "tunnels",
            connected,
            args.nodes,
            connected / args.nodes,
            connect_s=round(connect_s, 1),
            target=1000,
            **cond,
        )

        # Steady state: every node beats; measure round trips and the controller's CPU.
        log(f"steady heartbeats for {args.measure_s:.0f} s")
        t0, c0 = time.time(), cpu_s(cloud.pid)
        time.sleep(args.measure_s)
        t1, c1 = time.time(), cpu_s(cloud.pid)
        steady_cpu = 100 * (c1 - c0) / (t1 - t0)

        # Baseline rollout: a plain assignment to the rollout group.
        push(admin, root, "fleet-model", "1.0", "onnx")
        push(admin, root, "fleet-model", "2.0", "onnx")
        log(f"assigning fleet-model@1.0 to {args.rollout_nodes} nodes (baseline)")
        a0 = time.time()
        admin.assign("fleet-model@1.0", "group=rollout")
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        while time.monotonic() < deadline:
            nodes = [n for n in admin.list_nodes() if n["labels"].get("group") == "rollout"]
            done = sum(
                n["active"].get("fleet-model") == "1.0"
                and n["applied_generation"] == n["desired_generation"]
                for n in nodes
            )
            if done >= args.rollout_nodes:
                break
            time.sleep(1.0)
        assign_s = time.time() - a0
        log(f"assignment converged in {assign_s:.1f} s")

        log(f"rollout of fleet-model@2.0 to {args.rollout_nodes} nodes, waves {WAVES}")
        r0, rc0 = time.time(), cpu_s(cloud.pid)
        rollout = admin.create_rollout(
            {
                "artifact": "fleet-model@2.0",
                "selector": "group=rollout",
                "waves": WAVES,
                "gate": {"soak_s": args.soak_s, "max_error_rate": 0.05, "require_loaded": True},
            }
        )
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S
        state = rollout["state"]
        while time.monotonic() < deadline:
            r = admin.get_rollout(rollout["id"])
            state = r["state"]
            if state in ("succeeded", "rolled_back", "aborted", "paused"):
                break
            time.sleep(0.5)
        converge_s = time.time() - r0
        rollout_cpu = 100 * (cpu_s(cloud.pid) - rc0) / converge_s
        log(f"rollout {state} in {converge_s:.1f} s: {r['reason']}")
        rss, peak = rss_mib(cloud.pid)
        samples = clients.stop()
        steady = [ms for t, ms in samples["rtts"] if t0 <= t <= t1]
        during = [ms for t, ms in samples["rtts"] if r0 <= t <= r0 + converge_s]
        rtt = p95(steady)
        emit(
            "heartbeat_rtt_p95",
            "ms",
            rtt,
            solo_rtt,
            solo_rtt / rtt if rtt else 0.0,
            samples=len(steady),
            p95_during_rollout_ms=round(p95(during), 1),
            max_ms=round(max(steady, default=float("nan")), 1),
            target_ms=1000,
            window_s=args.measure_s,
            **cond,
        )
        emit(
            "controller_rss", "MiB", rss, idle_rss, idle_rss / rss, peak_mib=round(peak, 1), **cond
        )
        emit(
            "controller_cpu",
            "percent",
            steady_cpu,
            solo_cpu,
            solo_cpu / steady_cpu if steady_cpu else 0.0,
            note="share of one core while the fleet beats; baseline: one tunnel beating",
            during_rollout_percent=round(rollout_cpu, 1),
            **cond,
        )
        emit(
            "rollout_converge",
            "s",
            converge_s,
            assign_s,
            assign_s / converge_s,
            state=state,
            rollout_nodes=args.rollout_nodes,
            waves=WAVES,
            soak_s=args.soak_s,
            artifact_bytes=ARTIFACT_BYTES,
            target_s=120,
            client_errors=len(samples["errors"]),
            **cond,
        )
        for err in samples["errors"][:5]:
            log(f"client error: {err}")
        admin.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--rollout-nodes", type=int, default=200)
    p.add_argument("--processes", type=int, default=4, help="client processes")
    p.add_argument("--heartbeat-s", type=float, default=5.0, help="the edge default")
    p.add_argument("--measure-s", type=float, default=30.0)
    p.add_argument("--baseline-s", type=float, default=8.0)
    p.add_argument("--soak-s", type=float, default=2.0)
    a = p.parse_args()
    if a.rollout_nodes > a.nodes:
        p.error("--rollout-nodes cannot exceed --nodes")
    run(a)
