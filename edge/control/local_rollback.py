"""Local rollback: an edge returns a model to its previous version by itself when the new one
fails to load or keeps failing, if the policy allows it. The reconciler then keeps that version
off until the cloud's desired state names another one.
"""

from __future__ import annotations

import structlog

from fieldline.edge.store import EdgeStore
from fieldline.shared.health import LocalRollback, ModelHealth
from fieldline.shared.policy import Policy
from fieldline.shared.schemas import ArtifactState

log = structlog.get_logger(__name__)


class LocalRollbackGuard:
    def __init__(self, store: EdgeStore):
        self.store = store

    def check(self, models: dict[str, ModelHealth], policy: Policy) -> list[LocalRollback]:
        """Decide and persist the rollbacks these health reports call for; returns them."""
        if not policy.local_rollback:
            return []
        marked = {(r.name, r.sha256) for r in self.store.local_rollbacks()}
        active = self.store.active()
        decided: list[LocalRollback] = []
        for name, health in models.items():
            version = active.get(name)
            if version is None or health.version != version:
                continue
            reason = self._failing(health, policy)
            if reason is None:
                continue
            current = self.store.artifact(name, version)
            previous = self.store.previous(name)
            prev_row = self.store.artifact(name, previous) if previous else None
            if (
                current is None
                or prev_row is None
                or prev_row.state not in (ArtifactState.installed, ArtifactState.active)
                or (name, current.sha256) in marked
                or (name, prev_row.sha256) in marked  # never bounce between two bad versions
            ):
                continue
            mark = LocalRollback(
                name=name,
                from_version=version,
                to_version=prev_row.version,
                sha256=current.sha256,
                reason=reason,
            )
            self.store.add_local_rollback(mark)
            decided.append(mark)
            log.warning(
                "rolling back locally",
                model=name,
                version=version,
                to=prev_row.version,
                reason=reason,
            )
        return decided

    @staticmethod
    def _failing(health: ModelHealth, policy: Policy) -> str | None:
        if not health.loaded and health.error:
            return f"failed to load: {health.error}"
        if (
            health.window_requests >= policy.local_rollback_min_requests
            and health.error_rate >= policy.local_rollback_error_rate
        ):
            return (
                f"keeps failing: {health.error_rate:.0%} of {health.window_requests} requests "
                f"in the last {health.window_s:.0f} s were errors"
            )
        return None
