"""Pull execution on one node: the engine protocol, Docker and in-memory engines, the
registry resolver and the executor of dispatched items."""

from houndd.puller.engine import (
    Engine,
    EngineInfo,
    EngineUnavailableError,
    PruneReport,
    PullProgress,
    RegistryAuth,
)
from houndd.puller.executor import Executor, ItemReport, WorkItem
from houndd.puller.memory import FakeEngine
from houndd.puller.registry import RegistryClient, Resolved

__all__ = [
    "Engine",
    "EngineInfo",
    "EngineUnavailableError",
    "Executor",
    "FakeEngine",
    "ItemReport",
    "PruneReport",
    "PullProgress",
    "RegistryAuth",
    "RegistryClient",
    "Resolved",
    "WorkItem",
]
