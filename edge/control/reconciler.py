"""Reconciliation: make the installed and active artifacts match the persisted desired state.

Runs as one task; a new desired state wakes it, and a newer generation arriving mid-download
supersedes the one being applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import structlog

from fieldline.edge.control.installer import ArtifactInstaller, Fetcher, InstallError
from fieldline.edge.store import EdgeStore
from fieldline.shared.health import LocalRollback, ModelHealth, NodeHealth
from fieldline.shared.schemas import ArtifactStatus, DesiredState, ObservedState

log = structlog.get_logger(__name__)

RETRY_AFTER_NETWORK_ERROR_S = 3.0


class Reconciler:
    def __init__(
        self,
        store: EdgeStore,
        installer: ArtifactInstaller,
        fetch: Fetcher,
        report: Callable[[ObservedState], None],
        health: Callable[[], NodeHealth] = NodeHealth,
        on_applied: Callable[[DesiredState], None] | None = None,
        models: Callable[[], dict[str, ModelHealth]] = dict,
        check_models: Callable[[], bool] | None = None,
    ):
        self.store = store
        self.installer = installer
        self.fetch = fetch
        self.report = report
        self.health = health
        # Runs after every apply, complete or not, so the data plane uses what is installed.
        self.on_applied = on_applied
        # Per-model health for the observed state; check_models returns True when it decided a
        # local rollback (then this apply runs once more so the previous version is back at once).
        self.models = models
        self.check_models = check_models
        self._wake = asyncio.Event()
        # sha256s refused for their content: not fetched again until the desired state changes.
        self._refused: dict[str, str] = {}
        self._refused_generation = -1

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            desired = self.store.desired()
            if desired is None:
                continue
            retry = await self.apply(desired)
            if retry:
                asyncio.get_running_loop().call_later(RETRY_AFTER_NETWORK_ERROR_S, self.wake)

    async def apply(self, desired: DesiredState, *, again: bool = False) -> bool:
        """Apply one desired state; returns True when a transient error asks for a retry."""
        if desired.generation != self._refused_generation:
            self._refused.clear()
            self._refused_generation = desired.generation
        errors: list[str] = []
        retry = False
        marks = {(r.name, r.sha256): r for r in self.store.local_rollbacks()}
        wanted: set[tuple[str, str]] = set()
        for signed in desired.artifacts:
            if self._superseded(desired):
                return False
            try:
                m = self.installer.verify(signed)
            except InstallError as exc:
                errors.append(str(exc))
                self.installer.mark_failed(signed, str(exc))
                continue
            wanted.add((m.name, m.sha256))
            mark = marks.get((m.name, m.sha256))
            if mark is not None:
                errors.append(self._keep_rolled_back(mark))
                continue
            if m.sha256 in self._refused:
                errors.append(self._refused[m.sha256])
                continue
            if self.store.active().get(m.name) == m.version and self.installer.is_installed(m):
                continue
            try:
                await self.installer.install(signed, self.fetch)
                self.installer.activate(m)
            except InstallError as exc:
                self._refused[m.sha256] = str(exc)
                errors.append(str(exc))
                self.installer.mark_failed(signed, str(exc))
                log.error("artifact refused", artifact=m.ref, error=str(exc))
            except grpc.aio.AioRpcError as exc:
                msg = f"{m.ref}: download failed: {exc.code().name}: {exc.details()}"
                errors.append(msg)
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    self._refused[m.sha256] = msg
                    self.installer.mark_failed(signed, msg)
                else:
                    retry = True
                log.warning("artifact download failed", artifact=m.ref, error=msg)
            except Exception as exc:  # one artifact's surprise must not end reconciling
                msg = f"{m.ref}: install failed unexpectedly: {type(exc).__name__}: {exc}"
                log.exception("artifact install failed unexpectedly", artifact=m.ref)
                self._refused[m.sha256] = msg
                errors.append(msg)
                self.installer.mark_failed(signed, msg)
        if self._superseded(desired):
            return False
        for key, mark in marks.items():
            if key not in wanted:  # the cloud moved on from that version: it may come back later
                self.store.clear_local_rollback(mark.name, mark.sha256)
        if self.on_applied is not None:
            try:
                self.on_applied(desired)
            except Exception:  # the data plane's failure must not stop reconciling
                log.exception("applying the desired state to the data plane failed")
                errors.append("data plane: could not apply the policy (see the edge log)")
        if not again and self.check_models is not None and self.check_models():
            return await self.apply(desired, again=True)
        previous = self.store.observed()
        applied = (
            desired.generation if not errors else (previous.applied_generation if previous else 0)
        )
        self.publish(applied, errors)
        if not errors:
            log.info("desired state applied", generation=desired.generation)
        return retry

    def _keep_rolled_back(self, mark: LocalRollback) -> str:
        """Keep the version this node rolled back to active; the error tells the cloud why."""
        if self.store.active().get(mark.name) != mark.to_version and not self.installer.reactivate(
            mark.name, mark.to_version
        ):
            log.error("previous version is gone; cannot roll back", model=mark.name)
        return (
            f"{mark.name}@{mark.from_version} was rolled back on this node to "
            f"{mark.to_version}: {mark.reason}"
        )

    def _superseded(self, desired: DesiredState) -> bool:
        current = self.store.desired()
        return current is not None and current.generation > desired.generation

    def observed(self, applied: int, errors: list[str]) -> ObservedState:
        return ObservedState(
            applied_generation=applied,
            artifacts=[
                ArtifactStatus(
                    name=a.name, version=a.version, sha256=a.sha256, state=a.state, error=a.error
                )
                for a in self.store.artifacts()
            ],
            active=self.store.active(),
            errors=errors,
            health=self.health(),
            models=self.models(),
            local_rollbacks=self.store.local_rollbacks(),
        )

    def publish(self, applied: int, errors: list[str]) -> None:
        observed = self.observed(applied, errors)
        self.store.save_observed(observed)
        try:
            self.report(observed)
        except Exception:  # reporting is best effort: it is stored and resent on reconnect
            log.exception("could not report the observed state")
