"""Pull execution on one node: the engine protocol, Docker and in-memory engines and the
executor of dispatched items."""

from houndd.puller.engine import Engine, EngineInfo, PruneReport, PullProgress
from houndd.puller.executor import Executor, ItemReport, WorkItem
from houndd.puller.memory import FakeEngine

__all__ = [
    "Engine",
    "EngineInfo",
    "Executor",
    "FakeEngine",
    "ItemReport",
    "PruneReport",
    "PullProgress",
    "WorkItem",
]
