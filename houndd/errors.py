"""The one error root of houndd and its public subclasses.

Each class also inherits the built-in exception a caller would naturally catch
(aiohttp style), and messages name what to do next.
"""

from __future__ import annotations


class HounddError(Exception):
    """Root of every error houndd raises on purpose."""


class ConfigError(HounddError, ValueError):
    """Invalid configuration: names the key, where it was set (`where`: the file, the
    environment variable, the flag) and what was expected."""

    def __init__(self, key: str, message: str, *, where: str = "") -> None:
        super().__init__(
            f"config {key} ({where}): {message}" if where else f"config {key}: {message}"
        )
        self.key = key
        self.reason = message
        self.where = where


class KeyFileError(HounddError, PermissionError):
    """A secret file is missing, malformed or readable by group/others."""


class WireError(HounddError, ValueError):
    """Malformed, unauthenticated, replayed or oversize peer message."""


class PlanError(HounddError, ValueError):
    """An invalid plan document. `field` is a dotted path like `targets[0].images[1]`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class NoCoordinatorError(HounddError, TimeoutError):
    """No coordinator is known yet (election in progress); retry later."""


class PlanFinishedError(HounddError):
    """The plan already ended (`state` is done, failed or cancelled): cancelling it would
    change nothing but its reported outcome, so it is refused."""

    def __init__(self, plan_id: str, state: str) -> None:
        super().__init__(f"plan {plan_id} is already {state}; a finished plan cannot be cancelled")
        self.plan_id = plan_id
        self.state = state


class ReplicationError(HounddError):
    """A plan could not be stored on enough nodes to be acknowledged."""


class PullError(HounddError):
    """A pull failed. `reason` is a short stable name shown to users
    (manifest unknown, unauthorized, no space, timeout, registry unreachable, ...)."""

    def __init__(self, reason: str, detail: str = "", *, transient: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.transient = transient


class PullTimeout(PullError, TimeoutError):
    """A pull did not finish within the plan's per-image timeout."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("timeout", detail, transient=True)


class EngineUnavailable(HounddError, ConnectionError):
    """The Docker engine cannot be reached."""


# Stable failure reasons: users, scripts and the scheduler's retry decision depend on them.
MANIFEST_UNKNOWN = "manifest unknown"
UNAUTHORIZED = "unauthorized"
NO_SPACE = "no space"
TIMEOUT = "timeout"
REGISTRY_UNREACHABLE = "registry unreachable"
CANCELLED = "cancelled"
ENGINE_UNAVAILABLE = "engine unavailable"
IMAGE_IN_USE = "image in use"
# Anything the engine reports that matches none of the above; the detail says what.
PULL_FAILED = "pull failed"

# Worth retrying: the same request may succeed later without anyone changing anything.
TRANSIENT_REASONS = frozenset({TIMEOUT, REGISTRY_UNREACHABLE, ENGINE_UNAVAILABLE})


class EngineUnavailableError(PullError, EngineUnavailable):
    """The Docker engine cannot be reached: a transient `PullError` and an `EngineUnavailable`
    (a `ConnectionError`), so callers catching either see it. Check `docker_host`."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(ENGINE_UNAVAILABLE, detail, transient=True)


def pull_error(reason: str, detail: str = "") -> PullError:
    """A `PullError` whose `transient` flag follows from its reason."""
    if reason == ENGINE_UNAVAILABLE:
        return EngineUnavailableError(detail)
    return PullError(reason, detail, transient=reason in TRANSIENT_REASONS)
