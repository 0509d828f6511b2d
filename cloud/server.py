"""The cloud process: the admin API (uvicorn) and the tunnel server (grpc.aio) in one asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys

import grpc
import structlog
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fieldline.cloud.api.app import create_app
from fieldline.cloud.api.http_guard import guarded_protocol
from fieldline.cloud.context import BootstrapKeyError, CloudContext, open_context
from fieldline.cloud.pki import PkiError, TlsMaterial, load_tls
from fieldline.cloud.tunnel.enrollment import EnrollmentService
from fieldline.cloud.tunnel.limits import HARD_FACTOR, MessageLimitInterceptor
from fieldline.cloud.tunnel.ratelimit import RateLimiter
from fieldline.cloud.tunnel.service import TunnelService
from fieldline.shared.config import CloudSettings
from fieldline.shared.logs import configure_logging
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc
from fieldline.shared.sdnotify import Notifier, run_watchdog

log = structlog.get_logger(__name__)

GRPC_OPTIONS = [
    # Edges ping through NAT to keep the tunnel alive; let them, even between calls.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # A client must finish the TLS/HTTP2 handshake in this time (slow clients hold no slot).
    ("grpc.server_handshake_timeout_ms", 10_000),
]
GRPC_STOP_GRACE_S = 3.0
PORTS_FILE = "ports.json"


def grpc_options(settings: CloudSettings) -> list[tuple[str, int]]:
    """Server options. Messages above grpc_max_message_bytes are refused (RESOURCE_EXHAUSTED)
    by MessageLimitInterceptor, logged and counted; gRPC core's limit is a silent backstop."""
    limit = settings.grpc_max_message_bytes
    return [
        *GRPC_OPTIONS,
        ("grpc.max_receive_message_length", limit * HARD_FACTOR),
        ("grpc.max_send_message_length", limit * HARD_FACTOR),
    ]


class CloudServer:
    """Owns the context, the HTTP server and the gRPC servers; start() then stop().

    Plain: one gRPC server carries enrollment and the tunnel. TLS: the tunnel port requires a
    client certificate, so enrollment (whose callers have none yet) gets its own listener with
    server-authenticated TLS; the admin API serves HTTPS.
    """

    def __init__(self, settings: CloudSettings):
        self.settings = settings
        self.ctx: CloudContext | None = None
        self.tls: TlsMaterial | None = None
        self.http_port = 0
        self.grpc_port = 0
        self.enroll_port = 0
        self._servers: list[grpc.aio.Server] = []
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None

    def _grpc_server(self) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
        assert self.ctx is not None
        metrics = self.ctx.metrics
        limiter = MessageLimitInterceptor(
            self.settings.grpc_max_message_bytes,
            on_oversize=lambda m: metrics.tunnel_errors.labels("oversize").inc(),
        )
        server = grpc.aio.server(
            options=grpc_options(self.settings),
            maximum_concurrent_rpcs=self.settings.grpc_max_concurrent_rpcs,
            interceptors=[limiter],
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        self._servers.append(server)
        return server, health_servicer

    @staticmethod
    def _bind(server: grpc.aio.Server, addr: str, creds: grpc.ServerCredentials | None) -> int:
        port = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
        if port == 0:
            raise OSError(f"cannot listen for gRPC on {addr}")
        return port

    async def start(self) -> None:
        s = self.settings
        if s.tls:
            self.tls = load_tls(s)
        self.ctx = ctx = open_context(s)
        ctx.sessions.loop = asyncio.get_running_loop()
        tls = self.tls
        enrollment = EnrollmentService(
            ctx.db,
            ctx.public_key,
            ctx.metrics,
            limiter=RateLimiter(
                rate_per_s=s.enroll_rate_per_s,
                burst=s.enroll_burst,
                global_rate_per_s=s.enroll_global_rate_per_s,
            ),
            ca=tls.ca if tls else None,
            node_cert_days=s.node_cert_days,
            audit_keep=s.audit_max_rows,
        )
        tunnel = TunnelService(
            ctx.db,
            ctx.blobs,
            ctx.sessions,
            ctx.desired,
            ctx.records,
            ctx.metrics,
            s.chunk_bytes,
            tls=tls is not None,
        )
        server, tunnel_health = self._grpc_server()
        pb_grpc.add_TunnelServicer_to_server(tunnel, server)
        healths = [tunnel_health]
        if tls is None:
            pb_grpc.add_EnrollmentServicer_to_server(enrollment, server)
            self.grpc_port = self._bind(server, f"{s.grpc_host}:{s.grpc_port}", None)
        else:
            mtls = grpc.ssl_server_credentials(
                [(tls.server_key_pem, tls.server_chain_pem)],
                root_certificates=tls.node_ca_pem,
                require_client_auth=True,
            )
            self.grpc_port = self._bind(server, f"{s.grpc_host}:{s.grpc_port}", mtls)
            enroll_server, enroll_health = self._grpc_server()
            pb_grpc.add_EnrollmentServicer_to_server(enrollment, enroll_server)
            server_tls = grpc.ssl_server_credentials([(tls.server_key_pem, tls.server_chain_pem)])
            enroll_host = s.enroll_host or s.grpc_host
            self.enroll_port = self._bind(
                enroll_server, f"{enroll_host}:{s.enroll_port}", server_tls
            )
            healths.append(enroll_health)
            ctx.tls_pin = tls.pin
            ctx.enroll_port = self.enroll_port
        for srv in self._servers:
            await srv.start()
        for h in healths:
            await h.set("", health_pb2.HealthCheckResponse.SERVING)

        # Bind the HTTP socket ourselves so port 0 works and the real port is known.
        sock = socket.socket(socket.AF_INET6 if ":" in s.http_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((s.http_host, s.http_port))
        self.http_port = sock.getsockname()[1]
        ssl_files: dict[str, str] = {}
        if tls is not None:
            ssl_files = {
                "ssl_certfile": str(s.tls_cert_file or s.data_dir / "tls" / "server.crt"),
                "ssl_keyfile": str(s.tls_key_file or s.data_dir / "tls" / "server.key"),
            }
        config = uvicorn.Config(
            create_app(ctx),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
            http=guarded_protocol(
                header_timeout_s=s.http_header_timeout_s,
                body_idle_timeout_s=s.http_body_idle_timeout_s,
                on_timeout=lambda kind: ctx.metrics.http_slow_clients.labels(kind).inc(),
            ),
            limit_concurrency=s.http_max_connections,
            **ssl_files,  # type: ignore[arg-type]
        )
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises what stopped it
            await asyncio.sleep(0.01)

        ctx.rollouts.start()  # resumes the rollouts a previous run left running
        ports: dict[str, object] = {
            "http": self.http_port,
            "grpc": self.grpc_port,
            "tls": tls is not None,
        }
        if tls is not None:
            ports.update(enroll=self.enroll_port, ca=str(s.data_dir / "tls" / "ca.crt"))
        # Atomically: a starter polls for this file and must never read half of it.
        tmp = s.data_dir / f"{PORTS_FILE}.tmp"
        tmp.write_text(json.dumps(ports))
        os.replace(tmp, s.data_dir / PORTS_FILE)
        log.info(
            "cloud serving",
            http=f"{s.http_host}:{self.http_port}",
            grpc=f"{s.grpc_host}:{self.grpc_port}",
            enroll=self.enroll_port or None,
            tls=tls is not None,
            data=str(s.data_dir),
        )

    async def stop(self) -> None:
        if self.ctx is not None:
            await self.ctx.rollouts.stop()
        if self._http is not None:
            self._http.should_exit = True
        if self._http_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._http_task
        for srv in self._servers:
            await srv.stop(GRPC_STOP_GRACE_S)
        if self.ctx is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.data_dir / PORTS_FILE)
            self.ctx.close()


async def _serve(settings: CloudSettings) -> int:
    server = CloudServer(settings)
    await server.start()
    assert server.ctx is not None
    if server.ctx.new_admin_key:
        # Printed once, on the first start; it is also in DATA/admin.key (mode 0600).
        print(f"admin API key (shown once; also in {settings.data_dir / 'admin.key'}):")
        print(server.ctx.new_admin_key, flush=True)
    scheme = "https" if server.tls else "http"
    line = (
        f"fieldline cloud: {scheme} on {settings.http_host}:{server.http_port}, "
        f"grpc on {settings.grpc_host}:{server.grpc_port}"
    )
    if server.tls:
        line += (
            f" (mutual TLS), enrollment on port {server.enroll_port}; "
            f"CA {settings.data_dir / 'tls' / 'ca.crt'} sha256 {server.tls.fingerprint}"
        )
    print(line, file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    notifier = Notifier()
    notifier.ready(f"serving {scheme} :{server.http_port}, grpc :{server.grpc_port}")
    watchdog = asyncio.create_task(run_watchdog(notifier), name="watchdog")
    await stop.wait()
    log.info("cloud stopping")
    notifier.stopping()
    watchdog.cancel()
    await server.stop()
    notifier.close()
    return 0


def serve(settings: CloudSettings) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    configure_logging(settings.log_level)
    try:
        return asyncio.run(_serve(settings))
    except (OSError, PkiError, BootstrapKeyError) as exc:
        print(f"fieldline cloud: {exc}", file=sys.stderr)
        return 1
