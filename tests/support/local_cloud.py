"""A real cloud inside the test's event loop (grpc.aio tunnel and admin API on loopback, SQLite
in a temporary folder) and a node enrolled with it through the edge's own enroll()."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldline.cli.admin_client import AdminClient
from fieldline.cloud.context import ADMIN_KEY_FILE
from fieldline.cloud.server import CloudServer
from fieldline.edge.control.enroll import enroll
from fieldline.edge.store import Credential, EdgeStore
from fieldline.shared.config import CloudSettings
from fieldline.shared.schemas import NodeInfo


@dataclass
class LocalCloud:
    server: CloudServer
    data_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    def admin(self) -> AdminClient:
        key = (self.data_dir / ADMIN_KEY_FILE).read_text().strip()
        return AdminClient(f"http://127.0.0.1:{self.server.http_port}", key)

    async def api(self, call: str, *args: Any, **kwargs: Any) -> Any:
        """One AdminClient call, off the loop (the API is served by this same loop)."""

        def run() -> Any:
            with self.admin() as admin:
                return getattr(admin, call)(*args, **kwargs)

        return await asyncio.to_thread(run)

    async def enroll(self, store: EdgeStore, labels: dict[str, str] | None = None) -> Credential:
        token = (await self.api("create_token", labels or {}))["token"]
        return await enroll(
            store, cloud=self.address, token=token, node_info=NodeInfo.of_this_host("test")
        )


@asynccontextmanager
async def local_cloud(data_dir: Path, grpc_port: int = 0) -> AsyncIterator[LocalCloud]:
    """Start a cloud on free ports (or the given tunnel port, to restart one) and stop it after."""
    settings = CloudSettings(
        data_dir=data_dir, http_port=0, grpc_port=grpc_port, enroll_port=0, offline_after_s=5
    )
    server = CloudServer(settings)
    await server.start()
    try:
        yield LocalCloud(server, data_dir)
    finally:
        await server.stop()
