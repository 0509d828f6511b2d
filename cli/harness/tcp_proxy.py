"""A loopback TCP proxy that can be cut (every connection closed, new ones refused) and restored,
blackholed (bytes vanish, sockets stay open), and can add a one-way delay and count the bytes.

The demo and the fault tests put it between edges and the cloud to take the tunnel away; the
ingest bench puts it there to make a 200 ms round trip and to count wire bytes.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpProxy:
    """delay_s: added to every byte in each direction (a round trip gains 2 * delay_s), without
    limiting throughput (bytes are queued, not held back by the reader)."""

    def __init__(self, target: tuple[str, int], *, delay_s: float = 0.0):
        self.target = target
        self.delay_s = delay_s
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0
        self._blackholed = threading.Event()
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._stopped = False

    def start(self) -> TcpProxy:
        self._listen()
        return self

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        self._up.set()
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        delayed: queue.SimpleQueue[tuple[float, bytes]] | None = None
        if self.delay_s > 0:
            delayed = queue.SimpleQueue()
            threading.Thread(target=self._send_late, args=(delayed, src, dst), daemon=True).start()
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                if self._blackholed.is_set():
                    continue  # read and dropped: the sender sees an open, silent peer
                if delayed is not None:
                    delayed.put((time.monotonic() + self.delay_s, data))
                else:
                    dst.sendall(data)
        if delayed is not None:
            delayed.put((0.0, b""))  # the writer closes after what is queued
            return
        self._close_pair(src, dst)

    def _send_late(
        self,
        delayed: queue.SimpleQueue[tuple[float, bytes]],
        src: socket.socket,
        dst: socket.socket,
    ) -> None:
        with contextlib.suppress(OSError):
            while True:
                due, data = delayed.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        self._close_pair(src, dst)

    @staticmethod
    def _close_pair(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def blackhole(self) -> None:
        """Drop every byte from now on, both ways, keeping the connections open."""
        self._blackholed.set()

    def unblackhole(self) -> None:
        self._blackholed.clear()

    def cut(self) -> None:
        """Close every connection and stop listening: the edge sees the cloud vanish."""
        self._up.clear()
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone leaves it listening.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def restore(self) -> None:
        self._listen()

    def stop(self) -> None:
        self.cut()
