"""The edge daemon: owns the store, the tunnel, the reconciler and the scheduler, in start order.

`run_edge` is what `fieldline edge run` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from pydantic import BaseModel, ValidationError

from fieldline.edge.control.enroll import EnrollmentError, enroll
from fieldline.edge.control.installer import ArtifactInstaller
from fieldline.edge.control.local_rollback import LocalRollbackGuard
from fieldline.edge.control.reconciler import Reconciler
from fieldline.edge.control.tunnel import TunnelClient
from fieldline.edge.gateway.app import GatewayServer
from fieldline.edge.gateway.deps import GatewayState
from fieldline.edge.ingest.dataplane import DataPlane
from fieldline.edge.ingest.mqtt import MqttConfigError
from fieldline.edge.llm.services import LlmServices, choose_llm
from fieldline.edge.store import EdgeStore
from fieldline.shared.clock import utcnow
from fieldline.shared.config import EdgeSettings
from fieldline.shared.health import ModelHealth, NodeHealth
from fieldline.shared.logs import configure_logging
from fieldline.shared.proto import tunnel_pb2 as pb
from fieldline.shared.schemas import ArtifactKind, DesiredState, NodeInfo, ObservedState
from fieldline.shared.sdnotify import Notifier, run_watchdog

log = structlog.get_logger(__name__)

AGENT_VERSION = "0.1.0"
EXIT_OK = 0
EXIT_CONFIG = 2


class AgentError(Exception):
    """The agent cannot start (no credential and no token, enrollment refused, ...)."""


def _read_token_file(settings: EdgeSettings) -> str | None:
    if settings.token_file is None:
        return None
    try:
        return settings.token_file.read_text().strip() or None
    except OSError as exc:
        raise AgentError(
            f"cannot read the token file {settings.token_file}: {exc.strerror}"
        ) from exc


class EdgeAgent:
    """Start order: store, credential, tunnel, reconciler, scheduler; stop runs in reverse."""

    def __init__(self, settings: EdgeSettings):
        self.settings = settings
        self.store: EdgeStore | None = None
        self.tunnel: TunnelClient | None = None
        self.reconciler: Reconciler | None = None
        self.scheduler: AsyncIOScheduler | None = None
        self.dataplane: DataPlane | None = None
        self.llm: LlmServices | None = None
        self.gateway: GatewayServer | None = None
        self._llm_tasks: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._health_unsaved = False  # the last heartbeat could not save health (logged once)
        self._cleanup: list[Callable[[], Awaitable[None]]] = []
        # Each part adds its health report here, keyed by its NodeHealth field (tunnel,
        # dataplane, llm, gateway); a part the node does not run has none (None in NodeHealth).
        self.health_sources: dict[str, Callable[[], BaseModel]] = {}
        self._part_errors: dict[str, str] = {}  # the last error logged per part
        # Per-model health sources (ONNX inspection here; an engine may add its own).
        self.model_sources: list[Callable[[], dict[str, ModelHealth]]] = []
        self.rollback_guard: LocalRollbackGuard | None = None

    async def start(self) -> None:
        s = self.settings
        self.store = store = EdgeStore(s.data_dir)
        self._cleanup.append(self._close_store)
        cloud = s.cloud or store.get_meta("cloud")
        node_info = NodeInfo.of_this_host(AGENT_VERSION)
        credential = store.credential()
        if credential is None:
            token = s.token or _read_token_file(s)
            if not (cloud and token):
                raise AgentError(
                    f"{s.data_dir} holds no node credential: the first start needs "
                    "--cloud HOST:PORT and --token TOKEN"
                )
            try:
                credential = await enroll(
                    store,
                    cloud=cloud,
                    token=token,
                    node_info=node_info,
                    enroll_address=s.enroll,
                    ca_file=s.cloud_ca_file,
                    server_name=s.tls_server_name,
                )
            except EnrollmentError as exc:
                raise AgentError(str(exc)) from exc
            log.info("enrolled", node=credential.node_id, cloud=cloud)
        elif s.cloud and s.cloud != store.get_meta("cloud"):
            store.set_meta(cloud=s.cloud)
        if cloud is None:
            raise AgentError("no cloud address: pass --cloud HOST:PORT")

        installer = ArtifactInstaller(store, credential.cloud_public_key)
        await installer.recover()  # before anything reads the store's artifact states
        self.tunnel = tunnel = TunnelClient(
            s,
            cloud,
            credential,
            node_info,
            on_desired=self._on_desired,
            on_connected=self._on_connected,
            applied_generation=self._applied_generation,
            tls=store.node_tls(),
        )
        self.health_sources["tunnel"] = tunnel.health
        try:
            self.dataplane = dataplane = DataPlane(s, store, credential.node_id, tunnel.send)
        except MqttConfigError as exc:
            raise AgentError(str(exc)) from exc
        dataplane.start()
        self._cleanup.append(self._stop_dataplane)
        tunnel.records_epoch = lambda: dataplane.sync.epoch
        tunnel.on_records_welcome = dataplane.on_records_welcome
        tunnel.on_records_ack = dataplane.on_records_ack
        self._tasks.append(asyncio.create_task(dataplane.run_sync(), name="sync"))
        self.health_sources["dataplane"] = dataplane.health
        # The LLM services, then the gateway that serves them; stopped in reverse.
        self.llm = llm = LlmServices(
            s.gateway,
            s.llm,
            lambda: dataplane.policy,
            publish=dataplane.publish_event,
            store=dataplane.store_event,
        )
        await llm.start()
        self._cleanup.append(self._stop_llm)
        gateway_state = GatewayState(
            settings=s.gateway,
            services=llm,
            inspect=lambda rule, payload, publish: dataplane.inspection.submit(
                rule, payload, publish=publish
            ),
            extra_registries=[dataplane.registry],
        )
        self.gateway = gateway = GatewayServer(gateway_state, s.data_dir)
        await gateway.start()
        self._cleanup.append(gateway.stop)
        dataplane.on_verdict = llm.explainer.on_verdict
        self.health_sources["llm"] = llm.health
        self.health_sources["gateway"] = gateway.health
        self.model_sources.append(dataplane.model_health)
        self.model_sources.append(llm.llm.model_health)
        self.rollback_guard = LocalRollbackGuard(store)
        self.reconciler = reconciler = Reconciler(
            store,
            installer,
            tunnel.fetch,
            self._report,
            health=self.health,
            on_applied=self._on_applied,
            models=self.model_health,
            check_models=self._check_models,
        )
        # The last persisted desired state applies at once, with or without the cloud.
        reconciler.wake()
        self._tasks.append(asyncio.create_task(reconciler.run(), name="reconciler"))
        self._tasks.append(asyncio.create_task(tunnel.run(), name="tunnel"))
        self._cleanup.append(tunnel.stop)

        self.scheduler = AsyncIOScheduler()
        self.scheduler.add_job(
            self._heartbeat,
            "interval",
            seconds=s.heartbeat_interval_s,
            id="heartbeat",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.add_job(
            llm.prefetcher.run_once,
            "interval",
            seconds=s.gateway.prefetch_interval_s,
            id="prefetch",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.start()
        self._cleanup.append(self._stop_scheduler)
        log.info("edge agent started", node=credential.node_id, data=str(s.data_dir))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for step in reversed(self._cleanup):
            try:
                await step()
            except Exception:  # keep stopping the rest; say what failed
                log.exception("error while stopping", step=getattr(step, "__name__", str(step)))
        self._cleanup.clear()

    async def _stop_dataplane(self) -> None:
        if self.dataplane is not None:
            # Blocking joins (writer flush, inspection drain): off the loop.
            await asyncio.to_thread(self.dataplane.stop)

    def _on_applied(self, desired: DesiredState) -> None:
        """After each reconcile: the data plane takes the policy, the LLM services the active LLM
        (loading it takes seconds, so it runs as a task; the runtime serializes loads)."""
        assert self.dataplane is not None and self.llm is not None
        self.dataplane.apply(desired)
        choice = choose_llm(
            self.dataplane.policy, self.dataplane.installed_models(ArtifactKind.llm)
        )
        task = asyncio.get_running_loop().create_task(self.llm.apply(choice))
        self._llm_tasks.add(task)
        task.add_done_callback(self._llm_tasks.discard)

    async def _stop_llm(self) -> None:
        for task in list(self._llm_tasks):
            task.cancel()
        await asyncio.gather(*self._llm_tasks, return_exceptions=True)
        if self.llm is not None:
            await self.llm.stop()

    async def _stop_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)

    async def _close_store(self) -> None:
        if self.store is not None:
            self.store.close()

    def model_health(self) -> dict[str, ModelHealth]:
        models: dict[str, ModelHealth] = {}
        for source in self.model_sources:
            try:
                models.update(source())
            except Exception:  # one broken source must not hide the others
                log.exception("model health source failed")
        return models

    def _check_models(self) -> bool:
        """Decide local rollbacks from the models' health; True when one was decided."""
        if self.rollback_guard is None or self.dataplane is None:
            return False
        return bool(self.rollback_guard.check(self.model_health(), self.dataplane.policy))

    def health(self) -> NodeHealth:
        """The heartbeat's summary: per-model health, local rollbacks, and each part's report.

        A part whose report raises or does not validate as its NodeHealth field is left out and
        named in part_errors, so one broken part is seen without hiding the others.
        """
        health = NodeHealth(
            models=self.model_health(),
            local_rollbacks=self.store.local_rollbacks() if self.store is not None else [],
            reported_at=utcnow(),
        )
        for name, source in self.health_sources.items():
            try:
                # Checked on its own (a typed part is taken as it is, not validated again).
                part = getattr(NodeHealth.model_validate({name: source()}), name)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:2000]
                if self._part_errors.get(name) != error:  # logged once, reported every beat
                    log.exception("health source failed", source=name)
                health.part_errors[name] = self._part_errors[name] = error
                continue
            setattr(health, name, part)
        return health

    async def _heartbeat(self) -> None:
        """Each beat: keep the health summary in the store (for `edge status`) and send it.

        A coroutine, so APScheduler runs it on the loop: the tunnel's queue is not thread-safe.
        """
        # A model that keeps failing is rolled back here (the reconciler does the switching).
        if self._check_models() and self.reconciler is not None:
            self.reconciler.wake()
        health = self.health()
        if self.store is not None:
            try:
                self.store.save_health(health)
            except sqlite3.OperationalError as exc:  # a full disk: the beat still goes out
                if not self._health_unsaved:
                    log.error("cannot save health in edge.db", error=str(exc))
                self._health_unsaved = True
            else:
                self._health_unsaved = False
        if self.tunnel is not None:
            self.tunnel.heartbeat(health.model_dump_json())

    def _applied_generation(self) -> int:
        observed = self.store.observed() if self.store else None
        return observed.applied_generation if observed else 0

    async def _on_desired(self, push: pb.DesiredStatePush) -> None:
        assert self.store is not None and self.reconciler is not None
        try:
            desired = DesiredState.model_validate_json(push.desired_json)
        except ValidationError as exc:
            log.error("desired state from the cloud does not validate", error=str(exc)[:300])
            return
        if desired.generation != push.generation:
            log.error("desired state generation mismatch", push=push.generation)
            return
        # Persist before acting, so a crash or reboot resumes from this generation.
        if self.store.save_desired(desired):
            log.info("desired state received", generation=desired.generation)
            self.reconciler.wake()

    async def _on_connected(self) -> None:
        # The cloud may have restarted or missed reports: tell it where we are.
        observed = self.store.observed() if self.store else None
        if observed is not None:
            self._report(observed)

    def _report(self, observed: ObservedState) -> None:
        if self.tunnel is not None:
            self.tunnel.send(
                pb.EdgeMessage(
                    observed=pb.ObservedStateReport(observed_json=observed.model_dump_json())
                )
            )
            # Fresh model health right after a change, not at the next beat: gates read it.
            self.tunnel.heartbeat(self.health().model_dump_json())


async def _run(settings: EdgeSettings) -> int:
    agent = EdgeAgent(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except AgentError as exc:
        print(f"fieldline edge: {exc}", file=sys.stderr)
        await agent.stop()
        return EXIT_CONFIG
    # systemd (Type=notify): ready once started; the watchdog pings come from this loop, so
    # a wedged loop stops them and systemd restarts the daemon.
    notifier = Notifier()
    notifier.ready("edge agent running")
    watchdog = asyncio.create_task(run_watchdog(notifier), name="watchdog")
    await stop.wait()
    log.info("edge agent stopping")
    notifier.stopping()
    watchdog.cancel()
    await agent.stop()
    notifier.close()
    return EXIT_OK


def run_edge(settings: EdgeSettings) -> int:
    """Run the daemon until SIGINT/SIGTERM; returns the exit code."""
    configure_logging(settings.log_level)
    return asyncio.run(_run(settings))
