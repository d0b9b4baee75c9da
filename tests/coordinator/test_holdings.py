"""`Holdings` between members over the in-memory transport: each node answers from its own
(fake) engine; one that does not answer in time, or whose engine is down, is reported as such.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from houndd.coordinator.holdings import Holdings
from houndd.coordinator.local import LocalWork
from houndd.coordinator.messages import ImageAt
from houndd.puller.memory import FakeEngine
from tests.membership.test_service import cluster

REG = "registry.test:5000"


class EngineOnly:
    """The `LocalExecutor` of a node that only answers questions about its engine."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.release = asyncio.Event()
        self.blocked = False

    def submit(
        self, plan_id: str, items: Sequence[LocalWork], *, per_node_parallelism: int
    ) -> None:
        raise AssertionError("no work is dispatched in these tests")

    def abort(self, plan_id: str, images: Sequence[str] | None = None) -> None:
        pass

    def forget(self, plan_id: str) -> None:
        pass

    async def has_image(self, ref: str) -> str | None:
        if self.blocked:
            await self.release.wait()
        return await self.engine.has_image(ref)

    async def free_disk_bytes(self) -> int | None:
        return (await self.engine.info()).free_disk_bytes


async def test_targets_answer_from_their_engines_and_silence_is_reported(tmp_path: Path) -> None:
    async with cluster(tmp_path, 4) as nodes:
        engines = [FakeEngine(free_disk_bytes=(i + 1) << 30) for i in range(4)]
        locals_ = [EngineOnly(e) for e in engines]
        holdings = [Holdings(n.bus, local) for n, local in zip(nodes, locals_, strict=True)]
        a, b = f"{REG}/a:1", f"{REG}/b:1"
        da, db = (engines[0].add_registry_image(ref, 1000) for ref in (a, b))
        engines[1].preload(f"{REG}/a@{da}")  # node 1 holds a
        engines[2].preload(f"{REG}/b@{'sha256:' + 'e' * 64}")  # node 2: b, another digest
        locals_[3].blocked = True  # node 3 never finishes looking
        wanted = [ImageAt(a, da), ImageAt(b, db)]
        try:
            answers = await holdings[0].ask({n.id: wanted for n in nodes}, timeout_s=0.5)
        finally:
            locals_[3].release.set()
        assert answers[nodes[0].id].held == frozenset()
        assert answers[nodes[1].id].held == {a}
        assert answers[nodes[2].id].held == frozenset()  # b at another digest is not b here
        assert [answers[n.id].free_disk_bytes for n in nodes[:3]] == [1 << 30, 2 << 30, 3 << 30]
        silent = answers[nodes[3].id]
        assert silent.held is None and silent.error == "no answer within 0.5 s"

        await engines[1].close()  # the engine is down: the node says so instead of guessing
        answers = await holdings[0].ask({nodes[1].id: wanted}, timeout_s=5)
        down = answers[nodes[1].id]
        assert down.held is None and "engine unavailable" in down.error, down
