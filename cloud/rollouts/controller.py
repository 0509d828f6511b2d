"""The rollout controller: moves each rollout through its waves by pinning the wave's nodes to the
new version (their desired state follows), holding the health gate over the soak window, and
rolling back what fails. Everything it decides is in the store, so a restart resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import structlog
from pydantic import ValidationError

from fieldline.cloud.desired import DesiredStateService
from fieldline.cloud.rollouts.gate import NodeCheck, Outcome, Target, check_node
from fieldline.cloud.rollouts.spec import OnFailure, RolloutSpec, plan_waves
from fieldline.cloud.store import artifacts as artifact_store
from fieldline.cloud.store import nodes as node_store
from fieldline.cloud.store import policies as policy_store
from fieldline.cloud.store import rollouts as rollout_store
from fieldline.cloud.store.db import Database
from fieldline.cloud.tunnel.sessions import SessionRegistry
from fieldline.shared.clock import utcnow
from fieldline.shared.ids import new_id
from fieldline.shared.schemas import DesiredState, SignedManifest, selector_matches

log = structlog.get_logger(__name__)

ROLLOUT_TICK_S = 1.0  # how often running rollouts are looked at (CloudSettings.rollout_tick_s)
REASON_NODES_SHOWN = 3  # a wave's failure reason names this many nodes, then counts the rest


class RolloutRefused(Exception):
    """A rollout request that cannot be carried out; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


class RolloutController:
    """Owns every change of a rollout's state. API threads call create/pause/resume/abort;
    the tick runs in a worker thread; one lock keeps them from interleaving."""

    def __init__(
        self,
        db: Database,
        desired: DesiredStateService,
        sessions: SessionRegistry,
        tick_s: float = ROLLOUT_TICK_S,
    ):
        self.db = db
        self.desired = desired
        self.sessions = sessions
        self.tick_s = tick_s
        self.started_at = utcnow()
        self._lock = threading.RLock()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.started_at = utcnow()
        self._task = asyncio.create_task(self._run(), name="rollouts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:  # one bad tick must not end the controller; say what broke
                log.exception("rollout tick failed")
            await asyncio.sleep(self.tick_s)

    def tick(self) -> None:
        """Advance every pending or running rollout by what the nodes reported."""
        for r in rollout_store.list_rollouts(self.db, states=("pending", "running"), limit=1000):
            with self._lock:
                self._advance(r.id)

    # -- requests from the API ---------------------------------------------------------------

    def create(self, spec: RolloutSpec, actor: str) -> str:
        """Validate against the fleet, plan the waves, store the rollout (pending); its id."""
        with self._lock:
            kind = None
            if spec.artifact:
                try:
                    signed = artifact_store.get_artifact(
                        self.db, name=spec.artifact_name or "", version=spec.artifact_version or ""
                    )
                except artifact_store.ArtifactNotFound:
                    raise RolloutRefused(f"artifact {spec.artifact} not found", 404) from None
                kind = signed.manifest.kind.value
            for other in rollout_store.list_rollouts(
                self.db, states=rollout_store.ACTIVE_STATES, limit=1000
            ):
                o = RolloutSpec.model_validate_json(other.spec)
                if spec.artifact and o.artifact_name == spec.artifact_name:
                    raise RolloutRefused(
                        f"rollout {other.id} ({other.state}) is already rolling out "
                        f"{o.artifact}; finish or abort it first"
                    )
                if spec.policy and o.policy:
                    raise RolloutRefused(
                        f"rollout {other.id} ({other.state}) is already rolling out a policy; "
                        "finish or abort it first"
                    )
            nodes = [
                n
                for n in node_store.list_nodes(self.db)
                if selector_matches(spec.selector, n.labels)
            ]
            if not nodes:
                raise RolloutRefused(f"selector {_selector_text(spec)} matches no node", 422)
            # Online nodes first, so the canary wave does not start by waiting for a node.
            nodes.sort(key=lambda n: (not self.sessions.connected(n.id), n.created, n.id))
            plan = plan_waves(spec.waves, len(nodes))
            placed: list[tuple[str, int, str | None]] = []
            start = 0
            for wave, end in enumerate(plan):
                for n in nodes[start:end]:
                    placed.append((n.id, wave, _previous(spec, n.desired)))
                start = end
            rollout_id = new_id("ro")
            sizes = ", ".join(str(b - a) for a, b in zip([0, *plan], plan, strict=False))
            rollout_store.insert_rollout(
                self.db,
                rollout_id=rollout_id,
                spec_json=spec.model_dump_json(),
                created_by=actor,
                nodes=placed,
                reason=f"created: {spec.what} to {len(nodes)} node(s) in {len(plan)} "
                f"wave(s) of {sizes}" + (f" ({kind})" if kind else ""),
            )
            log.info("rollout created", rollout=rollout_id, what=spec.what, nodes=len(nodes))
            return rollout_id

    def pause(self, rollout_id: str, actor: str, reason: str = "") -> None:
        with self._lock:
            r = self._get(rollout_id)
            if r.state not in ("pending", "running"):
                raise RolloutRefused(
                    f"rollout {rollout_id} is {r.state}; only a pending or "
                    "running rollout can be paused"
                )
            rollout_store.update_rollout(
                self.db,
                rollout_id=rollout_id,
                state="paused",
                reason=f"paused by {actor}" + (f": {reason}" if reason else ""),
                event=("paused", reason or "paused by an operator"),
                actor=actor,
            )

    def resume(self, rollout_id: str, actor: str, reason: str = "") -> None:
        """Go on from where it paused; a wave that failed is tried again (its nodes re-pinned)."""
        with self._lock:
            r = self._get(rollout_id)
            if r.state != "paused":
                raise RolloutRefused(
                    f"rollout {rollout_id} is {r.state}; only a paused rollout can be resumed"
                )
            spec = self._spec(r)
            if r.wave_started_at is None:  # paused before its first wave started
                rollout_store.update_rollout(
                    self.db,
                    rollout_id=rollout_id,
                    state="pending",
                    reason="",
                    event=("pending", reason or "resumed"),
                    actor=actor,
                )
                return
            self._start_wave(
                r.id, spec, r.wave, f"resumed by {actor}" + (f": {reason}" if reason else ""), actor
            )

    def abort(self, rollout_id: str, actor: str, reason: str = "") -> None:
        """Stop for good and return every node of the rollout to its previous version."""
        with self._lock:
            r = self._get(rollout_id)
            if r.state not in rollout_store.ACTIVE_STATES:
                raise RolloutRefused(f"rollout {rollout_id} is already {r.state}")
            touched = [
                n.node_id
                for n in rollout_store.rollout_nodes(self.db, rollout_id=rollout_id)
                if n.state != "waiting"
            ]
            self._unpin(rollout_id, touched, "aborted: back to its previous version")
            why = f"aborted by {actor}" + (f": {reason}" if reason else "")
            rollout_store.update_rollout(
                self.db,
                rollout_id=rollout_id,
                state="aborted",
                reason=f"{why}; {len(touched)} node(s) returned to their previous version",
                event=("aborted", why),
                actor=actor,
            )

    # -- the state machine -------------------------------------------------------------------

    def _get(self, rollout_id: str) -> rollout_store.RolloutRow:
        try:
            return rollout_store.get_rollout(self.db, rollout_id=rollout_id)
        except rollout_store.RolloutNotFound:
            raise RolloutRefused(f"rollout {rollout_id} not found", 404) from None

    @staticmethod
    def _spec(r: rollout_store.RolloutRow) -> RolloutSpec:
        return RolloutSpec.model_validate_json(r.spec)

    def _waves(self, rollout_id: str) -> int:
        nodes = rollout_store.rollout_nodes(self.db, rollout_id=rollout_id)
        return max((n.wave for n in nodes), default=-1) + 1

    def _advance(self, rollout_id: str) -> None:
        r = rollout_store.get_rollout(self.db, rollout_id=rollout_id)
        try:
            spec = self._spec(r)
        except ValidationError as exc:  # stored by an older version that validated differently
            rollout_store.update_rollout(
                self.db,
                rollout_id=r.id,
                state="paused",
                reason=f"its stored spec no longer validates: {exc}"[:1000],
                event=("paused", "stored spec no longer validates"),
            )
            return
        if r.state == "pending":
            self._start_wave(r.id, spec, 0, "", "controller")
            return
        if r.state != "running" or r.wave_started_at is None:
            return
        self._evaluate_wave(r, spec)

    def _start_wave(
        self, rollout_id: str, spec: RolloutSpec, wave: int, why: str, actor: str
    ) -> None:
        nodes = rollout_store.rollout_nodes(self.db, rollout_id=rollout_id, wave=wave)
        ids = [n.node_id for n in nodes]
        if spec.artifact:
            rollout_store.set_pins(
                self.db,
                rollout_id=rollout_id,
                node_ids=ids,
                kind="artifact",
                name=spec.artifact_name or "",
                version=spec.artifact_version,
            )
        if spec.policy:
            rollout_store.set_pins(
                self.db,
                rollout_id=rollout_id,
                node_ids=ids,
                kind="policy",
                name=spec.policy_name or "default",
                version=None,
            )
        targets: dict[str, int] = {}
        updates: list[tuple[str, str, str]] = []
        for node_id in ids:
            try:
                targets[node_id] = self.desired.refresh(node_id).generation
                updates.append((node_id, "applying", ""))
            except node_store.NodeNotFound:
                updates.append((node_id, "failed", "the node no longer exists"))
        rollout_store.set_node_states(
            self.db, rollout_id=rollout_id, updates=updates, target_generations=targets
        )
        total = self._waves(rollout_id)
        rollout_store.update_rollout(
            self.db,
            rollout_id=rollout_id,
            state="running",
            reason="",
            wave=wave,
            wave_started_at=utcnow(),
            soak_started_at=None,
            event=(
                "running",
                f"wave {wave + 1}/{total} ({len(ids)} node(s)) started"
                + (f" ({why})" if why else ""),
            ),
            actor=actor,
        )
        log.info("rollout wave started", rollout=rollout_id, wave=wave + 1, nodes=len(ids))

    def _evaluate_wave(self, r: rollout_store.RolloutRow, spec: RolloutSpec) -> None:
        assert r.wave_started_at is not None
        now = utcnow()
        members = rollout_store.rollout_nodes(self.db, rollout_id=r.id, wave=r.wave)
        rows = node_store.get_nodes(self.db, node_ids=[m.node_id for m in members])
        target = Target.of(spec, self._artifact_kind(spec))
        # Offline time counts from the wave's start, the node's last word, or our own start.
        clock_floor = max(r.wave_started_at, self.started_at)
        failed: list[tuple[str, str]] = []
        checks: dict[str, NodeCheck] = {}
        for m in members:
            if m.state == "failed":
                failed.append((m.node_id, m.reason))
                continue
            row = rows.get(m.node_id)
            if row is None:
                failed.append((m.node_id, "the node no longer exists"))
                continue
            check = check_node(target, spec.gate, row, m.target_generation or 0)
            if check.outcome != Outcome.failed and not self.sessions.connected(m.node_id):
                since = max(clock_floor, row.last_seen or clock_floor)
                offline_s = (now - since).total_seconds()
                if offline_s > spec.offline_timeout_s:
                    check = NodeCheck(
                        Outcome.failed,
                        f"offline for more than {spec.offline_timeout_s:g} s during its wave",
                    )
                else:
                    check = NodeCheck(
                        check.outcome if check.outcome != Outcome.healthy else Outcome.applied,
                        f"offline since {since:%H:%M:%S}; waiting up to "
                        f"{spec.offline_timeout_s:g} s",
                    )
            elif check.outcome == Outcome.applying and (
                (now - clock_floor).total_seconds() > spec.apply_timeout_s
            ):
                check = NodeCheck(
                    Outcome.failed,
                    f"did not apply the new version within {spec.apply_timeout_s:g} s"
                    + (f" ({check.reason})" if check.reason else ""),
                )
            if check.outcome == Outcome.failed:
                failed.append((m.node_id, check.reason))
            checks[m.node_id] = check
        if failed:
            self._fail_wave(r, spec, failed)
            return
        soaking = r.soak_started_at is not None
        state_of = {
            Outcome.applying: "applying",
            Outcome.applied: "soaking" if soaking else "applied",
            Outcome.healthy: "soaking" if soaking else "applied",
        }
        changes = [
            (m.node_id, state_of[checks[m.node_id].outcome], checks[m.node_id].reason)
            for m in members
            if (m.state, m.reason)
            != (state_of[checks[m.node_id].outcome], checks[m.node_id].reason)
        ]
        if changes:
            rollout_store.set_node_states(self.db, rollout_id=r.id, updates=changes)
        if not all(c.outcome == Outcome.healthy for c in checks.values()):
            return
        total = self._waves(r.id)
        if r.soak_started_at is None:
            rollout_store.set_node_states(
                self.db,
                rollout_id=r.id,
                updates=[(m.node_id, "soaking", "") for m in members],
            )
            rollout_store.update_rollout(
                self.db,
                rollout_id=r.id,
                soak_started_at=now,
                event=(
                    "running",
                    f"wave {r.wave + 1}/{total}: all {len(members)} node(s) applied it; "
                    f"soaking {spec.gate.soak_s:g} s",
                ),
            )
            return
        soaked = (now - r.soak_started_at).total_seconds() >= spec.gate.soak_s
        # The gate must have been seen to hold after the soak began, on every node.
        fresh = all(
            rows[m.node_id].health_at is not None and rows[m.node_id].health_at >= r.soak_started_at  # type: ignore[operator]
            for m in members
        )
        if not (soaked and fresh):
            return
        rollout_store.set_node_states(
            self.db, rollout_id=r.id, updates=[(m.node_id, "healthy", "") for m in members]
        )
        if r.wave + 1 < total:
            self._start_wave(
                r.id, spec, r.wave + 1, f"wave {r.wave + 1}/{total} passed its gate", "controller"
            )
        else:
            self._succeed(r, spec)

    def _artifact_kind(self, spec: RolloutSpec) -> str | None:
        if not spec.artifact:
            return None
        try:
            signed = artifact_store.get_artifact(
                self.db, name=spec.artifact_name or "", version=spec.artifact_version or ""
            )
        except artifact_store.ArtifactNotFound:
            return None
        return signed.manifest.kind.value

    def _fail_wave(
        self, r: rollout_store.RolloutRow, spec: RolloutSpec, failed: list[tuple[str, str]]
    ) -> None:
        total = self._waves(r.id)
        shown = "; ".join(f"{n}: {why}" for n, why in failed[:REASON_NODES_SHOWN])
        if len(failed) > REASON_NODES_SHOWN:
            shown += f"; and {len(failed) - REASON_NODES_SHOWN} more"
        what = f"wave {r.wave + 1}/{total} failed its gate ({shown})"
        rollout_store.set_node_states(
            self.db, rollout_id=r.id, updates=[(n, "failed", why) for n, why in failed]
        )
        failed_ids = {n for n, _ in failed}
        log.warning("rollout wave failed", rollout=r.id, wave=r.wave + 1, reason=what)
        if spec.on_failure == OnFailure.rollback:
            touched = [
                n.node_id
                for n in rollout_store.rollout_nodes(self.db, rollout_id=r.id)
                if n.state != "waiting"
            ]
            self._unpin(r.id, touched, "rolled back with the rollout", keep=failed_ids)
            rollout_store.update_rollout(
                self.db,
                rollout_id=r.id,
                state="rolled_back",
                reason=f"{what}; {len(touched)} node(s) returned to their previous version",
                event=("rolled_back", what),
            )
            return
        if spec.auto_rollback:
            wave_ids = [
                n.node_id
                for n in rollout_store.rollout_nodes(self.db, rollout_id=r.id, wave=r.wave)
            ]
            self._unpin(r.id, wave_ids, "rolled back with its wave", keep=failed_ids)
            after = "its nodes returned to their previous version"
        else:
            after = "auto-rollback is off, so its nodes keep the new version"
        rollout_store.update_rollout(
            self.db,
            rollout_id=r.id,
            state="paused",
            reason=f"{what}; {after}; resume to retry the wave or abort to roll back",
            event=("paused", what),
        )

    def _unpin(
        self, rollout_id: str, node_ids: list[str], why: str, keep: set[str] | None = None
    ) -> None:
        """Drop the rollout's pins on these nodes; their desired state returns to what the
        assignments give, the version they ran before. Failed nodes keep their reason."""
        rollout_store.delete_pins(self.db, rollout_id=rollout_id, node_ids=node_ids)
        for node_id in node_ids:
            with contextlib.suppress(node_store.NodeNotFound):
                self.desired.refresh(node_id)
        keep = keep or set()
        reasons = {
            n.node_id: n.reason for n in rollout_store.rollout_nodes(self.db, rollout_id=rollout_id)
        }
        rollout_store.set_node_states(
            self.db,
            rollout_id=rollout_id,
            updates=[
                (
                    n,
                    "rolled_back",
                    f"failed: {reasons.get(n, '')}; rolled back" if n in keep else why,
                )
                for n in node_ids
            ],
        )

    def _succeed(self, r: rollout_store.RolloutRow, spec: RolloutSpec) -> None:
        """Make the result permanent as an assignment (and policy) over the selector."""
        if spec.artifact:
            artifact_store.add_assignment(
                self.db,
                name=spec.artifact_name or "",
                version=spec.artifact_version or "",
                selector=spec.selector,
            )
        if spec.policy:
            policy_store.add_policy(
                self.db,
                name=spec.policy_name or "default",
                document=spec.policy,
                selector=spec.selector,
            )
        rollout_store.delete_pins(self.db, rollout_id=r.id)
        members = rollout_store.rollout_nodes(self.db, rollout_id=r.id)
        for node_id in _unique([m.node_id for m in members]):
            with contextlib.suppress(node_store.NodeNotFound):
                self.desired.refresh(node_id)
        self.desired.refresh_matching(spec.selector)
        rollout_store.update_rollout(
            self.db,
            rollout_id=r.id,
            state="succeeded",
            reason=f"{spec.what} runs on all {len(members)} node(s); assigned to {_selector_text(spec)}",
            event=(
                "succeeded",
                f"every wave passed its gate; {spec.what} assigned to the selector",
            ),
        )
        log.info("rollout succeeded", rollout=r.id, nodes=len(members))


def _selector_text(spec: RolloutSpec) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.selector.items()) or "(every node)"


def _unique(items: list[str]) -> Iterator[str]:
    seen: set[str] = set()
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item


def _previous(spec: RolloutSpec, desired_json: str | None) -> str | None:
    """What the node ran before, for the record: the artifact's version, or the policy's name."""
    if not desired_json:
        return None
    try:
        desired = DesiredState.model_validate_json(desired_json)
    except ValidationError:
        return None
    parts: list[str] = []
    if spec.artifact_name:
        versions = [_manifest_version(m, spec.artifact_name) for m in desired.artifacts]
        parts.append(next((v for v in versions if v), "none"))
    if spec.policy:
        parts.append(f"policy {(desired.policy or {}).get('name', 'none')}")
    return ", ".join(parts) or None


def _manifest_version(signed: SignedManifest, name: str) -> str | None:
    try:
        m = signed.manifest
    except ValidationError:
        return None
    return m.version if m.name == name else None
