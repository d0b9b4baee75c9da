"""The composition root: builds every part of a node, runs them in one TaskGroup, and shuts
them down in order (membership leave, API site, loops, transport, engine, store).

The constructor does no IO. `run()` serves until `request_stop()` (SIGTERM/SIGINT in the CLI).
The daemon is also the `NodeApi` facade the HTTP handlers call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import random
import re
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from houndd import __version__
from houndd.api.app import make_app
from houndd.api.problems import ProblemError
from houndd.blobs import BlobSharing
from houndd.config import Config
from houndd.coordinator.local import LocalWork
from houndd.coordinator.results import ItemResult, ItemState
from houndd.coordinator.service import CoordinatorService
from houndd.coordinator.store import SqliteStore
from houndd.discovery import Discovery, default_route_address
from houndd.discovery.remembered import PEERS_FILE, PeerMemory
from houndd.discovery.seeds import parse_seed
from houndd.errors import ConfigError, HounddError, KeyFileError, WireError
from houndd.image.credentials import RegistryAuth
from houndd.image.registry import RegistryClient
from houndd.image.trust import RegistryTrust
from houndd.keyfiles import load_or_create_boot_epoch
from houndd.membership.bus import Bus
from houndd.membership.keyring_ops import KEYRING_OPS, ClusterKeyring, KeyringOpError
from houndd.membership.labels import Labels
from houndd.membership.member import Member, MemberState
from houndd.membership.messages import KeyringOpName
from houndd.membership.service import Membership
from houndd.membership.transport import PeerRejected, UdpHttpTransport
from houndd.metrics import Metrics
from houndd.puller.docker import DockerEngine
from houndd.puller.engine import Engine, EngineInfo, PruneReport, PullProgress
from houndd.puller.executor import Executor, ItemReport, WorkItem
from houndd.puller.memory import FakeEngine
from houndd.wire import Keyring, NodeIdentity, Wire, derive_api_token, schema
from houndd.wire.fields import MAX_COUNTER, MAX_SHORT_TEXT_CHARS, MAX_TEXT_CHARS

log = logging.getLogger("houndd.daemon")

ENGINE_REFRESH_S = 30.0
ITEM_STATES = ("pending", "pulling", "done", "failed", "cancelled")


class _Stopped(Exception):
    """Raised inside the TaskGroup to end it when a stop was requested."""


def notify_systemd(state: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if there is one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


def ensure_keys(config: Config) -> tuple[NodeIdentity, Keyring]:
    """Load the identity and cluster key, refusing loose file modes.

    With no keys at all in the default location (first `houndd run` on a single host), both are
    created, as `houndd init` would, and the paths printed.
    """
    state = config.state_path
    key_path = config.cluster_key_path
    if (
        not config.cluster_key_file
        and not key_path.exists()
        and not config.identity_key_path.exists()
    ):
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        Keyring.generate().save(key_path)
        print(
            f"houndd: created a new cluster key at {key_path}; copy it (mode 0600) to other "
            f"hosts and run `houndd init --join-key-file FILE` there",
            file=sys.stderr,
        )
    if not key_path.exists():
        raise KeyFileError(f"{key_path}: cluster key file not found; run `houndd init` first")
    identity = NodeIdentity.load_or_create(config.identity_key_path)
    return identity, Keyring.load(key_path)


def make_engine(docker_host: str) -> Engine:
    """The Docker engine, or with `fake://?pull_s=S&size=B&disk=F` the in-memory fake (tests
    and benchmarks of the coordination layer: every pull takes S seconds, any image exists,
    F bytes of disk are free)."""
    if not docker_host.startswith("fake://"):
        return DockerEngine(docker_host)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(docker_host).query)
    try:
        pull_s = float(query.get("pull_s", ["0.5"])[0])
        size = int(query.get("size", [str(10 << 20)])[0])
        disk = int(query.get("disk", [str(100 << 30)])[0])
    except ValueError:
        raise ConfigError(
            "docker_host", "fake:// takes pull_s=SECONDS, size=BYTES and disk=FREE_BYTES"
        ) from None
    return FakeEngine(
        pull_duration_s=pull_s, any_image_size=size, progress_steps=8, free_disk_bytes=disk
    )


class CountingEngine:
    """Counts the pulls that reach the engine: the proof that dedupe kept a re-dispatched item
    from being pulled twice (`houndd_engine_pulls_total`)."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self._engine = engine
        self._metrics = metrics

    async def info(self) -> EngineInfo:
        return await self._engine.info()

    async def free_disk(self) -> int | None:
        return await self._engine.free_disk()

    async def has_image(self, ref: str) -> str | None:
        return await self._engine.has_image(ref)

    async def pull(
        self, ref: str, *, auth: RegistryAuth | None, progress: Callable[[PullProgress], None]
    ) -> None:
        self._metrics.engine_pulls.inc()
        await self._engine.pull(ref, auth=auth, progress=progress)

    async def tag(self, source: str, target: str) -> None:
        await self._engine.tag(source, target)

    async def remove(self, ref: str, *, force: bool = False) -> None:
        await self._engine.remove(ref, force=force)

    async def prune(self) -> PruneReport:
        return await self._engine.prune()

    async def close(self) -> None:
        await self._engine.close()


class LocalPuller:
    """The puller of this node (its `Executor` and engine), adapted to the coordinator's
    `LocalExecutor` protocol: the coordinator package never imports the puller."""

    def __init__(self, executor: Executor, engine: Engine) -> None:
        self._executor = executor
        self._engine = engine

    def submit(
        self, plan_id: str, items: Sequence[LocalWork], *, per_node_parallelism: int
    ) -> None:
        work = [
            WorkItem(
                op=i.op,
                image=i.image,
                digest=i.digest,
                attempt=i.attempt,
                timeout_s=i.timeout_s,
                pull_policy=i.pull_policy,
                auth=i.auth,
                peers=i.peers,
            )
            for i in items
        ]
        self._executor.submit(plan_id, work, per_node_parallelism=per_node_parallelism)

    def abort(self, plan_id: str, images: Sequence[str] | None = None) -> None:
        self._executor.abort(plan_id, images)

    def forget(self, plan_id: str) -> None:
        self._executor.forget(plan_id)

    async def has_image(self, ref: str) -> str | None:
        return await self._engine.has_image(ref)

    async def free_disk_bytes(self) -> int | None:
        return await self._engine.free_disk()


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_REPORT_STATES = {"pulling": ItemState.PULLING, "done": ItemState.DONE, "failed": ItemState.FAILED}


def report_result(report: ItemReport) -> ItemResult:
    """The result a puller report stands for, within the bounds peers accept on the wire
    (an engine's error text can be long; a digest it reports must have the digest shape)."""
    digest = report.digest if _DIGEST.fullmatch(report.digest) else ""
    return ItemResult(
        state=_REPORT_STATES[report.state],
        attempt=report.attempt,
        digest=digest,
        bytes_done=max(0, report.bytes_done),
        bytes_total=max(0, report.bytes_total),
        bytes_registry=max(0, report.bytes_registry),
        bytes_peers=max(0, report.bytes_peers),
        bytes_cache=max(0, report.bytes_cache),
        reason=report.reason[:MAX_SHORT_TEXT_CHARS],
        detail=report.detail[:MAX_TEXT_CHARS],
        started_at=report.started_at,
        finished_at=report.finished_at,
        skipped=report.skipped,
        transient=report.transient,
    )


def advertise_host(config: Config) -> str:
    if config.advertise:
        return config.advertise
    if config.bind not in ("0.0.0.0", "::", ""):
        return config.bind
    if config.interfaces:
        return config.interfaces[0]
    return default_route_address()


class Daemon:
    """One houndd node."""

    def __init__(
        self,
        config: Config,
        *,
        engine: Engine | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.name = config.effective_node_name
        self.metrics = Metrics()
        self._engine_override = engine
        self._rng = rng or random.Random()
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.engine_info: EngineInfo | None = None
        self.engine_error = "not checked yet"
        self._runner: web.AppRunner | None = None
        self._shutdown_done = False
        # built in start()
        self.wire: Wire
        self.keyring: Keyring
        self.transport: UdpHttpTransport
        self.bus: Bus
        self.membership: Membership
        self.labels: Labels
        self.cluster_keys: ClusterKeyring
        self.discovery: Discovery
        self.peer_memory: PeerMemory
        self.engine: Engine
        self.executor: Executor
        self.registry: RegistryClient
        self.store: SqliteStore
        self.service: CoordinatorService
        self.blobs: BlobSharing | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Begin an orderly shutdown (safe to call more than once)."""
        if not self._stop.is_set():
            log.info("stopping reason=%s", reason)
            self._stop.set()

    async def _start(self) -> None:
        config = self.config
        identity, keyring = ensure_keys(config)
        self.keyring = keyring
        epoch = await asyncio.to_thread(load_or_create_boot_epoch, config.state_path)
        self.wire = Wire(
            cluster_id=config.cluster_name,
            keyring=keyring,
            identity=identity,
            boot_epoch=epoch,
            rotation_s=config.signing_key_rotation_s,
            grace_s=config.signing_key_grace_s,
            replay_window_s=config.replay_window_s,
            # Messages stamped before this start are refused: no replay window after a restart.
            started_at=time.time(),
        )
        host = advertise_host(config)
        self.store = SqliteStore(config.db_path)
        self.store.open()  # sqlite objects stay on the loop thread

        raw_engine = self._engine_override or make_engine(config.effective_docker_host)
        self.engine = CountingEngine(raw_engine, self.metrics)
        await self._refresh_engine()

        self.transport = UdpHttpTransport(config, advertise_host=host)
        await self.transport.start()
        info = self.engine_info
        local = Member(
            node_id=self.wire.node_id,
            name=self.name,
            host=host,
            port=self.transport.port,
            labels=dict(config.labels),
            incarnation=int(time.time() * 1000),  # outranks what we gossiped before a restart
            version=__version__,
            **_engine_metadata(info),
        )
        self.bus = Bus(
            config,
            self.wire,
            self.transport,
            on_handler_error=lambda kind: self.metrics.peer_handler_errors.labels(kind).inc(),
        )
        self.membership = Membership(config, self.bus, local, rng=self._rng)
        self.labels = Labels(config, self.bus, self.membership)
        self.cluster_keys = ClusterKeyring(config, self.bus, self.membership, keyring)
        me = self.wire.node_id
        self.peer_memory = PeerMemory(
            config.state_path / PEERS_FILE,
            lambda: [(m.host, m.port) for m in self.membership.alive() if m.node_id != me],
        )
        self.membership.subscribe(
            lambda _member, old, new: self.peer_memory.changed() if old != new else None
        )
        self.discovery = Discovery(
            config,
            me,
            identity.fingerprint,
            self.transport.port,
            self.membership.add_candidate,
            advertise_host=host,
            rng=self._rng,
            remembered=self.peer_memory.loaded,
        )
        self.registry = RegistryClient(
            aiohttp.ClientSession,
            insecure_registries=config.insecure_registries,
            trust=self._registry_trust,
        )
        self.blobs = self._blob_sharing(raw_engine)
        if self.blobs is not None:
            await self.blobs.start()
        self.executor = Executor(
            self.engine,
            node_id=self.wire.node_id,
            progress_interval_s=config.progress_interval_s,
            on_report=self._on_report,
            route=self.blobs.route if self.blobs is not None else None,
        )
        self.service = CoordinatorService(
            config,
            bus=self.bus,
            membership=self.membership,
            store=self.store,
            local=LocalPuller(self.executor, self.engine),
            registry=self.registry,
            metrics=self.metrics,
            keyring=keyring,
            rng=self._rng,
        )
        self.service.start()
        await self.labels.restore()
        self._watch_metrics()

        app = make_app(self, max_body_bytes=config.max_http_body_bytes)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        tls: ssl.SSLContext | None = None
        if config.tls_cert_file:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        site = web.TCPSite(self._runner, config.bind, self.transport.port, ssl_context=tls)
        await site.start()
        log.info(
            "serving node=%s id=%s address=%s:%d version=%s docker=%s",
            self.name,
            self.wire.node_id,
            host,
            self.transport.port,
            __version__,
            info.server_version if info else "unavailable",
        )

    def _blob_sharing(self, engine: Engine) -> BlobSharing | None:
        """Blob sharing needs a real dockerd behind the engine (the fake engine pulls from
        its own in-memory registry, not through a loopback one)."""
        if not self.config.p2p:
            return None
        if not isinstance(engine, DockerEngine):
            log.info("blob sharing off: the engine is not a Docker daemon")
            return None

        def address_of(node_id: str) -> tuple[str, int] | None:
            member = self.membership.get(node_id)
            return (member.host, member.port) if member is not None else None

        def usable(node_id: str) -> bool:
            member = self.membership.get(node_id)
            return member is not None and member.state in (MemberState.ALIVE, MemberState.SUSPECT)

        return BlobSharing(
            self.config,
            wire=self.wire,
            engine=engine,
            registry=self.registry,
            address_of=address_of,
            usable=usable,
            # one pull to houndd_engine_pulls_total, however many engine calls it makes
            on_pull=self.metrics.engine_pulls.inc,
        )

    async def run(self) -> None:
        """Start everything, serve until a stop is requested, then shut down in order."""
        try:
            await self._start()
            self.ready.set()
            notify_systemd("READY=1")
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.bus.run())
                tg.create_task(self.membership.run())
                tg.create_task(self.discovery.run())
                tg.create_task(self.executor.run())
                if self.blobs is not None:
                    tg.create_task(self.blobs.run())
                tg.create_task(self.service.run())
                tg.create_task(self.service.keep_present.run())
                tg.create_task(self._engine_loop())
                tg.create_task(self._join_seeds())
                tg.create_task(self._join_window())
                tg.create_task(self._until_stopped())
        except* _Stopped:
            pass
        finally:
            await self._shutdown()

    async def _until_stopped(self) -> None:
        await self._stop.wait()
        notify_systemd("STOPPING=1")
        # leave first, while the transport still works, so peers mark us left, not dead
        with contextlib.suppress(HounddError, OSError):
            await self.membership.leave()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        raise _Stopped

    async def _shutdown(self) -> None:
        if self._shutdown_done:
            return
        self._shutdown_done = True
        if self._runner is not None:
            await self._runner.cleanup()
        for closer in (
            "discovery",
            "peer_memory",
            "blobs",
            "service",
            "transport",
            "engine",
            "registry",
        ):
            part = getattr(self, closer, None)
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.close()
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
        log.info("stopped node=%s", self.name)

    async def _join_window(self) -> None:
        await self.discovery.first_round.wait()
        self.service.discovery_round_done()

    async def _join_seeds(self) -> None:
        if not self.config.seeds:
            return
        addresses = [parse_seed(s) for s in self.config.seeds]
        while not self._stop.is_set():
            joined = await self.membership.join(addresses)
            if joined:
                log.info("joined via seeds answered=%d of=%d", joined, len(addresses))
                return
            await asyncio.sleep(self.config.join_retry_s * (0.5 + self._rng.random()))

    def _registry_trust(self) -> RegistryTrust:
        """What this node's dockerd said about insecure registries (its defaults until it
        answers): the registry client reaches what dockerd reaches."""
        return self.engine_info.registry_trust if self.engine_info else RegistryTrust()

    async def _refresh_engine(self) -> None:
        try:
            self.engine_info = await self.engine.info()
            self.engine_error = ""
        except HounddError as e:
            if self.engine_error != str(e):
                log.warning(
                    "docker unavailable host=%s error=%s", self.config.effective_docker_host, e
                )
            self.engine_info = None
            self.engine_error = str(e)

    async def _engine_loop(self) -> None:
        while True:
            await asyncio.sleep(ENGINE_REFRESH_S * (0.8 + 0.4 * self._rng.random()))
            before = self.engine_info
            await self._refresh_engine()
            info = self.engine_info
            if info is not None and (before is None or before != info):
                self.membership.update_local(**_engine_metadata(info))

    def _watch_metrics(self) -> None:
        def members() -> dict[tuple[str, ...], float]:
            counts: dict[tuple[str, ...], float] = {(s.value,): 0.0 for s in MemberState}
            for m in self.membership.members():
                counts[(m.state.value,)] += 1
            return counts

        def refused() -> dict[tuple[str, ...], float]:
            out: dict[tuple[str, ...], float] = {
                (reason,): float(n) for reason, n in self.wire.refused.items()
            }
            for reason, n in self.transport.dropped.items():
                out[(reason,)] = out.get((reason,), 0.0) + n
            # Authentic messages whose payload does not fit its schema (a cluster-key holder's).
            out[("payload",)] = out.get(("payload",), 0.0) + self.bus.dropped["payload"]
            return out

        def items() -> dict[tuple[str, ...], float]:
            # from the plan views, so items that failed before dispatch (an image the registry
            # does not have) count as failed like any other
            counts = dict.fromkeys(ITEM_STATES, 0.0)
            for view in self.service.views.local_plans():
                for state, n in (view.get("summary") or {}).items():
                    if state in counts:
                        counts[state] += n
            return {(state,): n for state, n in counts.items()}

        def is_coordinator() -> dict[tuple[str, ...], float]:
            return {(): 1.0 if self.service.coordinator()[0] == self.wire.node_id else 0.0}

        def engine_up() -> dict[tuple[str, ...], float]:
            return {(): 1.0 if self.engine_info is not None else 0.0}

        self.metrics.watch("houndd_members", "members by state", ("state",), members)
        self.metrics.watch(
            "houndd_peer_messages_refused",
            "peer messages refused, by reason",
            ("reason",),
            refused,
            counter=True,
        )
        self.metrics.watch("houndd_items", "plan items by state", ("state",), items)
        self.metrics.watch(
            "houndd_peer_sent_messages",
            "peer messages sent (datagrams, requests, replies), by type",
            ("type",),
            lambda: {(k,): float(v) for k, v in self.bus.sent.items()},
            counter=True,
        )
        self.metrics.watch(
            "houndd_peer_sent_bytes",
            "sealed bytes of the peer messages sent, by type",
            ("type",),
            lambda: {(k,): float(v) for k, v in self.bus.sent_bytes.items()},
            counter=True,
        )
        self.metrics.watch(
            "houndd_plans", "plans by state", ("state",), self.service.views.plans_by_state
        )
        self.metrics.watch(
            "houndd_is_coordinator", "1 if this node coordinates now, else 0", (), is_coordinator
        )
        self.metrics.watch(
            "houndd_engine_up",
            "1 if this node's Docker engine answered its last check, else 0",
            (),
            engine_up,
        )
        if self.blobs is not None:
            self._watch_blob_metrics(self.blobs)

    def _watch_blob_metrics(self, blobs: BlobSharing) -> None:
        stats = blobs.stats

        def by(
            counter: Mapping[str, int], *keys: str
        ) -> Callable[[], dict[tuple[str, ...], float]]:
            return lambda: {(k,): float(counter.get(k, 0)) for k in {*keys, *counter}}

        Read = Callable[[], Mapping[tuple[str, ...], float]]
        counters: tuple[tuple[str, str, str, Read], ...] = (
            ("fetched_bytes", "blob bytes this node received into its cache, by source",
             "source", by(stats.fetched_bytes, "registry", "peer")),
            ("served_bytes", "blob bytes this node served, to its own dockerd or to peers",
             "reader", by(stats.served_bytes, "dockerd", "peer")),
            ("verify_failures", "blobs that did not match their digest, by who sent the bytes",
             "source", by(stats.verify_failures, "registry", "peer")),
            ("source_failures", "blob transfers that failed and moved on to another source",
             "kind", by(stats.source_failures)),
            ("cache_hits", "blob requests answered from the complete cache",
             "", lambda: {(): float(stats.cache_hits)}),
            ("cache_evictions", "blobs evicted from the cache to make room",
             "", lambda: {(): float(blobs.cache.evictions)}),
        )  # fmt: skip
        for name, doc, label, read in counters:
            labels = (label,) if label else ()
            self.metrics.watch(f"houndd_blob_{name}", doc, labels, read, counter=True)
        self.metrics.watch(
            "houndd_blob_cache_bytes",
            "bytes of complete blobs in the cache",
            (),
            lambda: {(): float(blobs.cache.stored_bytes)},
        )
        self.metrics.watch(
            "houndd_blob_uploads",
            "blob uploads to peers in progress",
            (),
            lambda: {(): float(blobs.limiter.active)},
        )

    def _on_report(self, report: ItemReport) -> None:
        # the executor is built before the service it reports to
        if report.state == "done" and report.op == "pull" and not report.skipped:
            self.metrics.bytes_pulled.inc(report.bytes_total)
        if report.state in ("done", "failed") and report.started_at and report.finished_at:
            self.metrics.pull_duration.labels(report.state).observe(
                max(0.0, report.finished_at - report.started_at)
            )
        self.service.on_report(report.plan_id, report.image, report_result(report))

    # --- NodeApi -------------------------------------------------------------------------------

    def api_tokens(self) -> list[str]:
        return [derive_api_token(k) for k in self.keyring.list()] + list(self.config.api_tokens)

    def health(self) -> dict[str, Any]:
        coordinator, term = self.service.coordinator()
        return {
            "status": "ok",
            "version": __version__,
            "node": self.name,
            "node_id": self.wire.node_id,
            "docker": "ok" if self.engine_info else "unavailable",
            "coordinator": coordinator,
            "term": term,
        }

    async def node_info(self) -> dict[str, Any]:
        await self._refresh_engine()
        info = self.engine_info
        docker: dict[str, Any]
        if info is None:
            docker = {
                "state": "unavailable",
                "error": self.engine_error,
                "host": self.config.effective_docker_host,
            }
        else:
            docker = {
                "state": "ok",
                "server_version": info.server_version,
                "kernel": info.kernel,
                "os": info.os,
                "free_disk_bytes": info.free_disk_bytes,
                "images": info.images,
            }
        local = self.membership.local
        return {
            "node_id": self.wire.node_id,
            "name": self.name,
            "address": f"{local.host}:{local.port}",
            "labels": dict(local.labels),
            "version": __version__,
            "docker": docker,
        }

    def _member_json(self, m: Member) -> dict[str, Any]:
        return {
            "node_id": m.node_id,
            "name": m.name,
            "host": m.host,
            "port": m.port,
            "state": m.state.value,
            "incarnation": m.incarnation,
            "labels": dict(m.labels),
            "kernel": m.kernel,
            "os": m.os,
            "docker_version": m.docker_version,
            "free_disk_bytes": m.free_disk_bytes,
            "version": m.version,
            "last_heard": m.last_heard if m.node_id != self.wire.node_id else time.time(),
        }

    def cluster(self) -> dict[str, Any]:
        coordinator, term = self.service.coordinator()
        coord_member = self.membership.get(coordinator) if coordinator else None
        members = sorted(self.membership.members(), key=lambda m: m.name)
        return {
            "cluster_id": self.config.cluster_name,
            "self": self.name,
            "self_id": self.wire.node_id,
            "coordinator": {
                "node_id": coordinator,
                "name": coord_member.name if coord_member else None,
            },
            "term": term,
            "members": [self._member_json(m) for m in members],
        }

    def member(self, name: str) -> dict[str, Any] | None:
        m = self.membership.by_name(name)
        return self._member_json(m) if m else None

    async def set_labels(self, name: str, labels: Mapping[str, str | None]) -> dict[str, Any]:
        result = await self.labels.set(name, labels)
        return {"name": name, "labels": result}

    async def keys(self, op: str, key: bytes | None) -> dict[str, Any]:
        if op == "list":
            listing = await self.cluster_keys.fingerprints()
            nodes: dict[str, Any] = {}
            for node, value in listing.items():
                if isinstance(value, str):
                    nodes[node] = {"error": value}
                else:
                    nodes[node] = {"keys": value}
            return {"op": op, "nodes": nodes}
        results = await self.cluster_keys.apply(_keyring_op(op), key)
        return {"op": op, "nodes": {n: {"error": err} if err else {} for n, err in results.items()}}

    async def submit_plan(self, body: bytes, content_type: str) -> dict[str, Any]:
        accepted = await self.service.submit(body, content_type)
        self.metrics.plans_submitted.inc()
        return schema.encode(accepted)

    async def preview_plan(self, body: bytes, content_type: str) -> dict[str, Any]:
        return schema.encode(await self.service.preview(body, content_type))

    async def plans(self) -> list[dict[str, Any]]:
        return await self.service.plans()

    async def plan(self, plan_id: str) -> dict[str, Any] | None:
        return await self.service.plan(plan_id)

    async def cancel_plan(self, plan_id: str) -> dict[str, Any] | None:
        return await self.service.cancel(plan_id)

    def plan_events(self, plan_id: str) -> AsyncGenerator[bytes, None]:
        return self.service.events(plan_id)

    async def peer(self, data: bytes, source: str | None) -> bytes:
        try:
            return await self.transport.handle_http(data, (source, 0) if source else None)
        except PeerRejected as e:
            raise _http_error(e.status, str(e)) from None
        except WireError as e:
            raise _http_error(400, f"refused: {e}") from None

    async def peer_blob(self, request: web.Request) -> web.StreamResponse:
        if self.blobs is None:
            raise ProblemError(404, "blob sharing is off", "this node does not share blobs")
        try:
            self.transport.admit_http(request.content_length or 0, request.remote or "")
        except PeerRejected as e:
            raise _http_error(e.status, str(e)) from None
        return await self.blobs.handle_peer(request)

    def metrics_text(self) -> tuple[bytes, str]:
        return self.metrics.render()


def _engine_metadata(info: EngineInfo | None) -> dict[str, Any]:
    """What the member record says about this node's engine, clipped to the wire's bounds."""
    return {
        "kernel": (info.kernel if info else platform.release())[:MAX_SHORT_TEXT_CHARS],
        "os": (info.os if info else platform.platform())[:MAX_SHORT_TEXT_CHARS],
        "docker_version": (info.server_version if info else "")[:MAX_SHORT_TEXT_CHARS],
        "free_disk_bytes": min(max(0, (info.free_disk_bytes or 0) if info else 0), MAX_COUNTER),
    }


def _keyring_op(op: str) -> KeyringOpName:
    for name in KEYRING_OPS:
        if name == op:
            return name
    raise KeyringOpError(f"unknown keyring op {op!r}")


def _http_error(status: int, text: str) -> web.HTTPException:
    exc = web.HTTPException(text=text)
    exc.set_status(status)
    return exc
