"""Human output of the CLI: rich tables and live progress. Scripts use `--json` instead."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

console = Console()
err_console = Console(stderr=True)
if not console.is_terminal:
    # piped into a file or CI log: do not truncate digests and error reasons to 80 columns
    console = Console(width=200)

_STATE_STYLE = {
    "alive": "green",
    "suspect": "yellow",
    "dead": "red",
    "left": "dim",
    "done": "green",
    "failed": "red",
    "pulling": "cyan",
    "pending": "dim",
    "cancelled": "yellow",
    "running": "cyan",
}


def _styled(state: str) -> str:
    style = _STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def _size(n: int | float | None) -> str:
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    delta = max(0.0, time.time() - float(ts))
    return f"{delta:.1f}s ago" if delta < 120 else f"{delta / 60:.0f}m ago"


def render_cluster(data: dict[str, Any]) -> None:
    coord = data.get("coordinator") or {}
    console.print(
        f"cluster [bold]{data.get('cluster_id', '?')}[/bold]  "
        f"coordinator [bold]{coord.get('name') or '(none: election pending)'}[/bold]  "
        f"term {data.get('term', 0)}  this node {data.get('self', '?')}"
    )
    table = Table(show_lines=False)
    for col in ("name", "state", "address", "labels", "docker", "free disk", "inc", "last heard"):
        table.add_column(col)
    for m in data.get("members", []):
        labels = ",".join(f"{k}={v}" for k, v in sorted((m.get("labels") or {}).items()))
        name = m.get("name", "?") + (" *" if m.get("node_id") == coord.get("node_id") else "")
        table.add_row(
            name,
            _styled(str(m.get("state", "?"))),
            f"{m.get('host')}:{m.get('port')}",
            labels or "-",
            m.get("docker_version") or "unavailable",
            _size(m.get("free_disk_bytes")),
            str(m.get("incarnation", 0)),
            _ago(m.get("last_heard")),
        )
    console.print(table)


def render_submit(accepted: dict[str, Any]) -> None:
    err_console.print(f"plan [bold]{accepted['id']}[/bold] accepted ({accepted.get('name', '')})")
    for g in accepted.get("groups", []):
        err_console.print(f"  group {g['image']} -> {', '.join(g['nodes'])}")
    for n in accepted.get("unknown_nodes", []):
        err_console.print(f"  [yellow]unknown node {n}: not a member, skipped[/yellow]")
    for s in accepted.get("empty_selectors", []):
        err_console.print(f"  [yellow]selector {s} matches no member[/yellow]")


def render_plan(plan: dict[str, Any]) -> None:
    summary = plan.get("summary", {})
    console.print(
        f"plan [bold]{plan.get('id')}[/bold] {plan.get('name', '')}: "
        f"{_styled(str(plan.get('state')))}"
        f"  ({', '.join(f'{k} {v}' for k, v in summary.items() if v)})"
    )
    table = Table()
    for col in ("node", "image", "state", "digest", "bytes", "attempts", "time", "error"):
        table.add_column(col)
    for it in plan.get("items", []):
        started, finished = it.get("started_at"), it.get("finished_at")
        took = f"{finished - started:.1f}s" if started and finished else "-"
        digest = str(it.get("digest") or "-")
        table.add_row(
            str(it.get("node")),
            str(it.get("image")),
            _styled(str(it.get("state"))) + (" (present)" if it.get("skipped") else ""),
            digest[:19] + ("..." if len(digest) > 19 else ""),
            _size(it.get("bytes_total") or it.get("bytes_done")),
            str(it.get("attempt", 0)),
            took,
            " ".join(x for x in (it.get("reason"), it.get("detail")) if x) or "",
        )
    console.print(table)


def render_plans(plans: list[dict[str, Any]]) -> None:
    table = Table()
    for col in ("id", "name", "action", "state", "items", "accepted"):
        table.add_column(col)
    for p in plans:
        s = p.get("summary", {})
        table.add_row(
            str(p.get("id")),
            str(p.get("name")),
            str(p.get("action", "pull")),
            _styled(str(p.get("state"))),
            f"{s.get('done', 0)}/{s.get('total', 0)} done, {s.get('failed', 0)} failed",
            _ago(p.get("accepted_at")),
        )
    console.print(table)


def render_keys(op: str, data: dict[str, Any]) -> None:
    table = Table()
    for col in ("node", "result", "keys"):
        table.add_column(col)
    for node, r in sorted(data.get("nodes", {}).items()):
        keys = r.get("keys") or []
        table.add_row(
            node, "[red]" + r["error"] + "[/red]" if r.get("error") else "ok", "\n".join(keys)
        )
    console.print(f"keys {op}:")
    console.print(table)


class PlanProgress:
    """Live per node x image progress from the plan's event stream."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self._live: Live | None = None

    def __enter__(self) -> PlanProgress:
        if self.enabled:
            self._live = Live(self._table(), console=err_console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(t, e, tb)

    def update(self, event: dict[str, Any]) -> None:
        plan = event.get("plan")
        if isinstance(plan, dict):
            for it in plan.get("items", []):
                self.items[(it["node"], it["image"])] = it
        item = event.get("item")
        if isinstance(item, dict):
            self.items[(item["node"], item["image"])] = item
        if self._live is not None:
            self._live.update(self._table())
        elif (
            not self.enabled and isinstance(item, dict) and item.get("state") in ("done", "failed")
        ):
            err_console.print(
                f"  {item['node']} {item['image']}: {item['state']} {item.get('reason') or ''}"
            )

    def _table(self) -> Table:
        table = Table(title="progress")
        for col in ("node", "image", "state", "progress"):
            table.add_column(col)
        for (node, image), it in sorted(self.items.items()):
            total, done = it.get("bytes_total") or 0, it.get("bytes_done") or 0
            pct = f"{100 * done / total:5.1f}%" if total else ""
            bar = "#" * int(20 * done / total) if total else ""
            table.add_row(
                node, image, _styled(str(it.get("state"))), f"{bar:<20} {pct} {_size(done)}"
            )
        return table
