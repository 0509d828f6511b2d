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
from fieldline.cloud.context import CloudContext, open_context
from fieldline.cloud.tunnel.service import EnrollmentService, TunnelService
from fieldline.shared.config import CloudSettings
from fieldline.shared.logs import configure_logging
from fieldline.shared.proto import tunnel_pb2_grpc as pb_grpc

log = structlog.get_logger(__name__)

GRPC_OPTIONS = [
    # Edges ping through NAT to keep the tunnel alive; let them, even between calls.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]
GRPC_STOP_GRACE_S = 3.0
PORTS_FILE = "ports.json"


class CloudServer:
    """Owns the context, the HTTP server and the gRPC server; start() then stop()."""

    def __init__(self, settings: CloudSettings):
        self.settings = settings
        self.ctx: CloudContext | None = None
        self.http_port = 0
        self.grpc_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        s = self.settings
        self.ctx = ctx = open_context(s)
        ctx.sessions.loop = asyncio.get_running_loop()

        self._grpc = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_EnrollmentServicer_to_server(
            EnrollmentService(ctx.db, ctx.public_key, ctx.metrics), self._grpc
        )
        pb_grpc.add_TunnelServicer_to_server(
            TunnelService(
                ctx.db,
                ctx.blobs,
                ctx.sessions,
                ctx.desired,
                ctx.records,
                ctx.metrics,
                s.chunk_bytes,
            ),
            self._grpc,
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot listen for gRPC on {s.grpc_host}:{s.grpc_port}")
        await self._grpc.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

        # Bind the HTTP socket ourselves so port 0 works and the real port is known.
        sock = socket.socket(socket.AF_INET6 if ":" in s.http_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((s.http_host, s.http_port))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(ctx),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
        )
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises what stopped it
            await asyncio.sleep(0.01)

        ctx.rollouts.start()  # resumes the rollouts a previous run left running
        # Written whole then renamed: a reader polling for the file never sees it half-written.
        ports_tmp = s.data_dir / f".{PORTS_FILE}.tmp"
        ports_tmp.write_text(json.dumps({"http": self.http_port, "grpc": self.grpc_port}))
        os.replace(ports_tmp, s.data_dir / PORTS_FILE)
        log.info(
            "cloud serving",
            http=f"{s.http_host}:{self.http_port}",
            grpc=f"{s.grpc_host}:{self.grpc_port}",
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
        if self._grpc is not None:
            await self._grpc.stop(GRPC_STOP_GRACE_S)
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
    print(
        f"fieldline cloud: http on {settings.http_host}:{server.http_port}, "
        f"grpc on {settings.grpc_host}:{server.grpc_port}",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("cloud stopping")
    await server.stop()
    return 0


def serve(settings: CloudSettings) -> int:
    """Run until SIGINT/SIGTERM; returns the process exit code."""
    configure_logging(settings.log_level)
    try:
        return asyncio.run(_serve(settings))
    except OSError as exc:
        print(f"fieldline cloud: {exc}", file=sys.stderr)
        return 1
