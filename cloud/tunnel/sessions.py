"""Connected tunnels: one outgoing queue per node, so a change can be pushed to it at once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fieldline.shared.proto import tunnel_pb2 as pb

OUTGOING_QUEUE = 1024


@dataclass
class Session:
    node_id: str
    queue: asyncio.Queue[pb.CloudMessage] = field(
        default_factory=lambda: asyncio.Queue(OUTGOING_QUEUE)
    )
    revoked: bool = False  # set with an empty message: the stream ends with PERMISSION_DENIED


class SessionRegistry:
    """Lives on the gRPC server's event loop; other threads post to it through the loop."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._revoked: set[str] = set()  # nodes revoked while this cloud runs

    def open(self, node_id: str) -> Session:
        old = self._sessions.get(node_id)
        if old is not None:  # a reconnect replaces a stream the edge gave up on
            old.queue.put_nowait(pb.CloudMessage())  # empty message: the old stream ends
        session = Session(node_id)
        self._sessions[node_id] = session
        return session

    def close(self, session: Session) -> None:
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]

    def connected(self, node_id: str) -> bool:
        return node_id in self._sessions

    def count(self) -> int:
        return len(self._sessions)

    def send(self, node_id: str, msg: pb.CloudMessage) -> bool:
        """Queue a message for a connected node (from any thread); False if it is not connected."""
        if self.loop is None:
            return False
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return self._send_here(node_id, msg)
        self.loop.call_soon_threadsafe(self._send_here, node_id, msg)
        return self.connected(node_id)

    def _send_here(self, node_id: str, msg: pb.CloudMessage) -> bool:
        session = self._sessions.get(node_id)
        if session is None:
            return False
        try:
            session.queue.put_nowait(msg)
        except asyncio.QueueFull:  # a stuck stream: drop it; the edge reconnects and resyncs
            self.close(session)
            return False
        return True

    def is_revoked(self, node_id: str) -> bool:
        return node_id in self._revoked

    def revoke(self, node_id: str) -> None:
        """End the node's open tunnel at once (from any thread); later calls are refused."""
        self._revoked.add(node_id)
        if self.loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._revoke_here(node_id)
        else:
            self.loop.call_soon_threadsafe(self._revoke_here, node_id)

    def _revoke_here(self, node_id: str) -> None:
        session = self._sessions.get(node_id)
        if session is None:
            return
        session.revoked = True
        if session.queue.full():  # make room: the stream is about to end anyway
            session.queue.get_nowait()
        session.queue.put_nowait(pb.CloudMessage())
