"""Human output of the CLI: plain tables and live progress, standard library only.

Tables are columns separated by spaces (like `docker ps`), never truncated: operators copy node
names, image references and plan ids from them. Colour and the redrawn progress region appear
only on a terminal (and not with NO_COLOR or TERM=dumb); anything piped gets plain lines.
Scripts use `-o json` instead.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

FINAL_STATES = frozenset({"done", "failed", "cancelled"})

_COLORS = {
    "alive": "32",
    "suspect": "33",
    "dead": "31",
    "left": "2",
    "done": "32",
    "failed": "31",
    "pulling": "36",
    "pending": "2",
    "cancelled": "33",
    "running": "36",
    "coordinator": "1",
    "bold": "1",
    "dim": "2",
}


class Term:
    """What one output stream can do: colour, width, height, redrawing lines in place."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.color = self.tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"

    def size(self) -> tuple[int, int]:
        """(columns, lines); 200 x 50 when not a terminal."""
        try:
            size = os.get_terminal_size(self.stream.fileno())
            return max(size.columns, 20), max(size.lines, 3)
        except (AttributeError, ValueError, OSError):
            return 200, 50

    def paint(self, text: str, style: str | None) -> str:
        code = _COLORS.get(style or "")
        return f"\x1b[{code}m{text}\x1b[0m" if code and self.color else text


# --- formatting -------------------------------------------------------------------------------


def size(n: float | None) -> str:
    """Bytes for humans (binary units, like `docker images`)."""
    if not n:
        return "0 B"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def duration(seconds: float | None) -> str:
    """`4s`, `2m05s`, `1h02m`."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    return duration(max(0.0, (now or time.time()) - float(ts))) + " ago"


def labels_text(labels: Mapping[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "-"


def selector_text(selector: Mapping[str, str]) -> str:
    """`gpu=true,zone=a`: a selector as the operator wrote it, not a Python dict."""
    return ",".join(f"{k}={v}" for k, v in selector.items())


Cell = str | tuple[str, str | None]
"""Table cell: text, or (text, style)."""


def table(
    term: Term, headers: Sequence[str], rows: Iterable[Sequence[Cell]], *, no_headers: bool
) -> list[str]:
    """Columns padded to their widest cell, separated by three spaces; nothing truncated."""
    plain_rows: list[list[tuple[str, str | None]]] = [
        [c if isinstance(c, tuple) else (c, None) for c in row] for row in rows
    ]
    if not no_headers:
        plain_rows.insert(0, [(h.upper(), None) for h in headers])
    if not plain_rows:
        return []
    widths = [max(len(r[i][0]) for r in plain_rows) for i in range(len(headers))]
    out = []
    for row in plain_rows:
        cells = []
        for i, (text, style) in enumerate(row):
            pad = "" if i == len(row) - 1 else " " * (widths[i] - len(text))
            cells.append(term.paint(text, style) + pad)
        out.append("   ".join(cells).rstrip())
    return out


# --- cluster ----------------------------------------------------------------------------------


def cluster_lines(
    data: Mapping[str, Any], term: Term, *, wide: bool, no_headers: bool
) -> list[str]:
    """`houndd status`: a summary line, then one row per member."""
    coord = data.get("coordinator") or {}
    coord_id = coord.get("node_id")
    headers = ["name", "role", "state", "address", "version", "docker", "labels", "last heard"]
    if wide:
        headers += ["node id", "incarnation", "kernel", "os", "free disk"]
    rows = []
    now = time.time()
    for m in data.get("members", []):
        role = "coordinator" if coord_id and m.get("node_id") == coord_id else "member"
        state = str(m.get("state", "?"))
        row: list[Cell] = [
            str(m.get("name", "?")),
            (role, "coordinator" if role == "coordinator" else None),
            (state, state),
            f"{m.get('host')}:{m.get('port')}",
            str(m.get("version") or "-"),
            str(m.get("docker_version") or "unavailable"),
            labels_text(m.get("labels")),
            ago(m.get("last_heard"), now),
        ]
        if wide:
            row += [
                str(m.get("node_id", "")),
                str(m.get("incarnation", 0)),
                str(m.get("kernel") or "-"),
                str(m.get("os") or "-"),
                size(m.get("free_disk_bytes")) if m.get("free_disk_bytes") else "-",
            ]
        rows.append(row)
    lines = []
    if not no_headers:
        coordinator = coord.get("name") or "none (election pending)"
        lines.append(
            f"cluster {data.get('cluster_id', '?')}   coordinator {coordinator}   "
            f"term {data.get('term', 0)}   this node {data.get('self', '?')}"
        )
    return lines + table(term, headers, rows, no_headers=no_headers)


# --- plans ------------------------------------------------------------------------------------


def summary_text(summary: Mapping[str, int]) -> str:
    total = int(summary.get("total", 0))
    parts = [f"{summary.get('done', 0)}/{total} done"]
    for state in ("failed", "cancelled", "pulling", "pending"):
        if summary.get(state):
            parts.append(f"{summary[state]} {state}")
    return ", ".join(parts)


def plans_lines(data: Mapping[str, Any], term: Term, *, wide: bool, no_headers: bool) -> list[str]:
    """`houndd plans` (the body of GET /v1/plans)."""
    plans: Sequence[Mapping[str, Any]] = data.get("plans", [])
    headers = ["id", "name", "action", "state", "items", "accepted"]
    if wide:
        headers += ["via", "coordinator"]
    rows = []
    now = time.time()
    for p in plans:
        state = str(p.get("state"))
        row: list[Cell] = [
            str(p.get("id")),
            str(p.get("name")),
            str(p.get("action", "pull")),
            (state, state),
            summary_text(p.get("summary") or {}),
            ago(p.get("accepted_at"), now),
        ]
        if wide:
            row += [str(p.get("via") or "-"), str(p.get("coordinator") or "-")]
        rows.append(row)
    return table(term, headers, rows, no_headers=no_headers)


def item_error(it: Mapping[str, Any]) -> str:
    return ": ".join(str(x) for x in (it.get("reason"), it.get("detail")) if x)


_SOURCES = (("bytes_registry", "registry"), ("bytes_peers", "peers"), ("bytes_cache", "cache"))


def sources_text(it: Mapping[str, Any]) -> str:
    """Where an item's bytes came from: `peers 5.7 MiB, registry 1.0 MiB`; `-` for none."""
    parts = [f"{label} {size(it[key])}" for key, label in _SOURCES if it.get(key)]
    return ", ".join(parts) or "-"


def plan_lines(
    plan: Mapping[str, Any], term: Term, *, wide: bool = False, no_headers: bool = False
) -> list[str]:
    """`houndd plan ID` and the report after `--wait`: one row per node x image, with where
    its bytes came from (the registry, peers, this node's blob cache)."""
    headers = ["node", "image", "state", "size", "from", "attempts", "time", "error"]
    if wide:
        headers.insert(3, "digest")
    rows = []
    for it in plan.get("items", []):
        state = str(it.get("state"))
        started, finished = it.get("started_at"), it.get("finished_at")
        took = duration(finished - started) if started and finished else "-"
        shown = state + (" (present)" if it.get("skipped") else "")
        total = it.get("bytes_total") or it.get("size_bytes") or it.get("bytes_done")
        row: list[Cell] = [
            str(it.get("node")),
            str(it.get("image")),
            (shown, state),
            size(total) if total else "-",
            sources_text(it),
            str(it.get("attempt", 0)),
            took,
            item_error(it) or "",
        ]
        if wide:
            row.insert(3, str(it.get("digest") or "-"))
        rows.append(row)
    lines = []
    if not no_headers:
        state = str(plan.get("state"))
        lines.append(
            f"plan {plan.get('id')} {plan.get('name', '')}: {term.paint(state, state)} "
            f"({summary_text(plan.get('summary') or {})})"
        )
    return lines + table(term, headers, rows, no_headers=no_headers)


def submit_notes(
    accepted: Mapping[str, Any], *, with_unresolved: bool = True
) -> tuple[list[str], list[str]]:
    """(information, problems) about an accepted submission, for stderr. Unresolved images
    can be left out when progress will report their items failed anyway."""
    info = [f"plan {accepted['id']} accepted ({accepted.get('name', '')})"]
    for g in accepted.get("groups", []):
        info.append(f"  group {g['image']} -> {', '.join(g['nodes'])}")
    problems = []
    for image, failure in (accepted.get("unresolved") or {}).items():
        why = ": ".join(str(x) for x in (failure.get("reason"), failure.get("detail")) if x)
        if with_unresolved:
            problems.append(f"image {image} cannot be pulled: {why}")
    for n in accepted.get("unknown_nodes", []):
        problems.append(f"node {n} is not a member: skipped (see `houndd status`)")
    for s in accepted.get("empty_selectors", []):
        problems.append(f"selector {selector_text(s)} matches no member")
    return info, problems


def submit_problems(accepted: Mapping[str, Any]) -> bool:
    """True if the plan was accepted with something it cannot serve (a dry run: would be)."""
    return bool(
        accepted.get("unresolved")
        or accepted.get("unknown_nodes")
        or accepted.get("empty_selectors")
        or accepted.get("no_space")
        or any(n.get("no_space") for n in accepted.get("nodes", []))
    )


def no_space_notes(accepted: Mapping[str, Any]) -> list[str]:
    """The images an accepted plan failed at once for lack of disk, one line per node."""
    return [
        f"node {node} has no room for {', '.join(images)}: failed as no space "
        f"(`houndd plan {accepted.get('id', 'ID')}` says how much it lacks)"
        for node, images in sorted((accepted.get("no_space") or {}).items())
    ]


def preview_lines(
    preview: Mapping[str, Any], term: Term, *, wide: bool = False, no_headers: bool = False
) -> list[str]:
    """`houndd submit --dry-run`: per target, what it lacks, the bytes to transfer, its free
    disk and whether that suffices."""
    sizes: Mapping[str, int] = preview.get("sizes") or {}
    headers = ["node", "lacks", "to transfer", "free disk", "fits"]
    if wide:
        headers.insert(2, "holds")
    rows: list[list[Cell]] = []
    total = 0
    for n in preview.get("nodes", []):
        free = n.get("free_disk_bytes")
        lacking = ", ".join(f"{i} ({size(sizes.get(i))})" for i in n.get("lacking", []))
        if not n.get("answered"):
            fits: Cell = (f"unknown: {n.get('note') or 'no answer'}", "suspect")
            lacking = f"? (not known; {lacking})" if lacking else "?"
        elif n.get("no_space"):
            fits = (f"no: {', '.join(n['no_space'])} would fail as no space", "failed")
        elif free is None:
            fits = ("unknown: free disk not known", "suspect")
        else:
            fits = ("yes", "done")
        total += int(n.get("bytes_needed") or 0)
        row: list[Cell] = [
            str(n.get("node")),
            lacking or "-",
            size(n.get("bytes_needed")),
            size(free) if free is not None else "-",
            fits,
        ]
        if wide:
            row.insert(2, ", ".join(n.get("present", [])) or "-")
        rows.append(row)
    lines = []
    if not no_headers:
        lines.append(
            f"dry run of {preview.get('action', 'pull')} plan {preview.get('name', '')!r}: "
            f"{len(rows)} nodes, {size(total)} to transfer "
            f"(nothing stored, nothing pulled; coordinator {preview.get('coordinator', '?')})"
        )
    return lines + table(term, headers, rows, no_headers=no_headers)


def keys_lines(op: str, data: Mapping[str, Any], term: Term, *, no_headers: bool) -> list[str]:
    rows: list[list[Cell]] = []
    for node, r in sorted((data.get("nodes") or {}).items()):
        result: Cell = (str(r["error"]), "failed") if r.get("error") else "ok"
        rows.append([node, result, ", ".join(r.get("keys") or []) or "-"])
    return table(term, ["node", "result", "keys"], rows, no_headers=no_headers)


# --- live progress ----------------------------------------------------------------------------

RATE_WINDOW_S = 8.0


class _Rate:
    """Bytes per second over the last few seconds of (time, bytes) samples."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, done: float) -> None:
        if self.samples and done < self.samples[-1][1]:
            self.samples.clear()  # a retry starts over
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()

    def per_s(self, now: float) -> float | None:
        if len(self.samples) < 2:
            return None
        t0, b0 = self.samples[0]
        t1, b1 = self.samples[-1]
        if now - t1 > RATE_WINDOW_S or t1 - t0 < 0.2:
            return None
        return (b1 - b0) / (t1 - t0)


def _eta(left: float, rate: float | None) -> str:
    if rate is None or rate <= 0 or left <= 0:
        return ""
    return "ETA " + duration(left / rate)


def _bar(done: float, total: float, width: int = 20) -> str:
    filled = int(width * min(1.0, done / total)) if total else 0
    return (
        "["
        + "=" * max(0, filled - 1)
        + (">" if 0 < filled < width else "=" if filled else "")
        + " " * (width - filled)
        + "]"
    )


class Progress:
    """Follows a plan's events and shows them like `docker pull`.

    On a terminal: a region redrawn in place, one row per node x image (one per image when the
    rows would not fit the screen) with bytes done/total, rate and ETA, and an overall line;
    failures are printed above it as they happen. Elsewhere: one line per finished item and an
    overall line now and then. `close()` clears the region, so the final report that follows is
    the only table left on screen.
    """

    PLAIN_SUMMARY_EVERY_S = 15.0

    def __init__(self, term: Term, *, live: bool, clock: Any = time.monotonic) -> None:
        self.term = term
        self.live = live and term.tty
        self._clock = clock
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self._rates: dict[tuple[str, str], _Rate] = {}
        self._deadlines: dict[tuple[str, str], float] = {}
        self._reported: set[tuple[str, str]] = set()
        self._plan: dict[str, Any] = {}
        self._drawn = 0
        self._last_draw = 0.0
        self._last_summary = clock()
        self._total_rate = _Rate()

    # feeding

    def update(self, event: Mapping[str, Any]) -> None:
        plan = event.get("plan")
        if isinstance(plan, dict):
            self.refresh(plan)
            return
        item = event.get("item")
        if isinstance(item, dict):
            self._item(item)
        self.draw()

    def refresh(self, plan: Mapping[str, Any]) -> None:
        """A whole plan view (snapshot, final, or fetched again)."""
        self._plan = {k: v for k, v in plan.items() if k != "items"}
        for it in plan.get("items", []):
            self._item(it)
        self.draw()

    def _item(self, it: Mapping[str, Any]) -> None:
        key = (str(it.get("node")), str(it.get("image")))
        now = self._clock()
        self.items[key] = dict(it)
        self._rates.setdefault(key, _Rate()).add(now, float(it.get("bytes_done") or 0))
        left = it.get("unavailable_in_s")
        if isinstance(left, int | float):
            self._deadlines[key] = now + float(left)
        else:
            self._deadlines.pop(key, None)
        state = str(it.get("state"))
        if state in FINAL_STATES and key not in self._reported:
            self._reported.add(key)
            if state == "failed":
                self._above(
                    self.term.paint("FAILED", "failed")
                    + f" {key[0]} {key[1]}: {item_error(it) or 'no reason given'}"
                )
            elif not self.live and state == "done":
                took = ""
                if it.get("started_at") and it.get("finished_at"):
                    took = ", " + duration(float(it["finished_at"]) - float(it["started_at"]))
                total = it.get("bytes_total") or it.get("size_bytes") or 0
                note = " (already present)" if it.get("skipped") else f" ({size(total)}{took})"
                self._above(f"done {key[0]} {key[1]}{note}")
            elif not self.live:
                self._above(f"{state} {key[0]} {key[1]}")

    # output

    def _above(self, line: str) -> None:
        """A permanent line: above the live region, which is then drawn again."""
        if self.live:
            self._clear()
        print(line, file=self.term.stream, flush=not self.live)
        if self.live:
            self._last_draw = 0.0

    def _clear(self) -> None:
        if self._drawn:
            self.term.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def tick(self) -> None:
        """Time passed without events: move ETAs and countdowns (and the plain summary)."""
        self.draw()

    def draw(self, *, force: bool = False) -> None:
        now = self._clock()
        if not self.live:
            if now - self._last_summary >= self.PLAIN_SUMMARY_EVERY_S and self.items:
                self._last_summary = now
                print(self.overall(now), file=self.term.stream, flush=True)
            return
        if not force and now - self._last_draw < 0.2:
            return
        self._last_draw = now
        columns, lines = self.term.size()
        body = self.rows(now, max_rows=lines - 2)
        body.append(self.overall(now))
        self._clear()
        text = "\n".join(body) + "\n"
        self.term.stream.write(text)
        self.term.stream.flush()
        self._drawn = sum(max(1, -(-_visible_len(line) // columns)) for line in body)

    def close(self) -> None:
        if self.live:
            self._clear()
            self.term.stream.flush()

    # content

    def _totals(self, keys: Iterable[tuple[str, str]]) -> tuple[float, float]:
        done = total = 0.0
        for key in keys:
            it = self.items[key]
            if it.get("state") in ("failed", "cancelled"):
                continue
            t = float(it.get("bytes_total") or it.get("size_bytes") or 0)
            d = t if it.get("state") == "done" else float(it.get("bytes_done") or 0)
            total += max(t, d)
            done += d
        return done, total

    def overall(self, now: float) -> str:
        counts: dict[str, int] = {}
        for it in self.items.values():
            counts[str(it.get("state"))] = counts.get(str(it.get("state")), 0) + 1
        summary = summary_text({"total": len(self.items), **counts})
        done, total = self._totals(self.items)
        self._total_rate.add(now, done)
        rate = self._total_rate.per_s(now)
        parts = [f"plan {self._plan.get('name') or ''} {self._plan.get('id', '')}".strip() + ":"]
        parts.append(summary)
        if total:
            parts.append(f"{size(done)} / {size(total)}")
        if rate:
            parts.append(f"{size(rate)}/s")
        eta = _eta(total - done, rate)
        if eta:
            parts.append(eta)
        return "   ".join(parts)

    def _node_note(self, key: tuple[str, str], now: float) -> str:
        it = self.items[key]
        node_state = it.get("node_state")
        if node_state in (None, "alive") or it.get("state") in FINAL_STATES:
            return ""
        if key in self._deadlines:
            left = max(0.0, self._deadlines[key] - now)
            return f"node {node_state}: fails as 'node unavailable' in ~{duration(left)}"
        return f"node {node_state}"

    def rows(self, now: float, *, max_rows: int) -> list[str]:
        keys = sorted(self.items)
        if len(keys) <= max_rows:
            return self._item_rows(keys, now)
        return self._image_rows(now, max_rows)

    def _item_rows(self, keys: Sequence[tuple[str, str]], now: float) -> list[str]:
        rows: list[list[Cell]] = []
        for key in keys:
            it = self.items[key]
            state = str(it.get("state"))
            done = float(it.get("bytes_done") or 0)
            total = float(it.get("bytes_total") or it.get("size_bytes") or 0)
            note = self._node_note(key, now)
            if state == "pulling" and total:
                rate = self._rates[key].per_s(now)
                detail = f"{_bar(done, total)} {size(done)} / {size(total)}"
                if rate:
                    detail += f"   {size(rate)}/s   {_eta(total - done, rate)}"
            elif state == "done":
                detail = "already present" if it.get("skipped") else size(total or done)
            elif state == "failed":
                detail = item_error(it)
            else:
                detail = ""
            rows.append([key[0], key[1], (state, state), " ".join(x for x in (detail, note) if x)])
        return table(self.term, ["node", "image", "state", "progress"], rows, no_headers=True)

    def _image_rows(self, now: float, max_rows: int) -> list[str]:
        by_image: dict[str, list[tuple[str, str]]] = {}
        for key in self.items:
            by_image.setdefault(key[1], []).append(key)
        rows: list[list[Cell]] = []
        images = sorted(by_image)
        shown = images if len(images) <= max_rows else images[: max(1, max_rows - 1)]
        for image in shown:
            keys = by_image[image]
            states: dict[str, int] = {}
            for k in keys:
                s = str(self.items[k].get("state"))
                states[s] = states.get(s, 0) + 1
            done, total = self._totals(keys)
            rate = sum(self._rates[k].per_s(now) or 0.0 for k in keys)
            dead = sum(1 for k in keys if self._node_note(k, now))
            parts = [summary_text({"total": len(keys), **states}) + " nodes"]
            if total:
                parts.append(f"{size(done)} / {size(total)}")
            if rate:
                parts += [f"{size(rate)}/s", _eta(total - done, rate)]
            if dead:
                parts.append(f"{dead} on unavailable nodes")
            overall = (
                "done"
                if states.get("done") == len(keys)
                else "failed"
                if states.get("failed")
                else "pulling"
                if states.get("pulling")
                else ""
            )
            rows.append([image, ("   ".join(p for p in parts if p), overall or None)])
        lines = table(self.term, ["image", "progress"], rows, no_headers=True)
        if len(shown) < len(images):
            lines.append(f"... and {len(images) - len(shown)} more images")
        return lines


def _visible_len(line: str) -> int:
    out, skipping = 0, False
    for ch in line:
        if ch == "\x1b":
            skipping = True
        elif skipping:
            skipping = ch != "m"
        else:
            out += 1
    return out


def write_lines(lines: Iterable[str], stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    for line in lines:
        out.write(line + "\n")
    out.flush()
