"""The CLI's pure parts: --api parsing, the default plan name, tables, progress rendering (with
a fake clock), shell completion generated from the parser. No daemon."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from typing import Any

import pytest

from houndd.cli import build_parser, with_default_name
from houndd.client import ApiAddress, BadApiAddress, parse_api
from houndd.completion import completion_script
from houndd.render import Progress, Term, plan_lines, table
from tests.procs import run_houndd


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7480", ApiAddress("http", "127.0.0.1", 7480)),
        ("node-1", ApiAddress("http", "node-1", 7480)),
        ("http://node-1:8000", ApiAddress("http", "node-1", 8000)),
        ("HTTPS://node-1", ApiAddress("https", "node-1", 7480)),
        ("http://node-1:7480/v1", ApiAddress("http", "node-1", 7480)),
        ("http://proxy/houndd/v1/", ApiAddress("http", "proxy", 7480, "/houndd")),
        ("[::1]:7480", ApiAddress("http", "::1", 7480)),
        ("http://[fe80::1]", ApiAddress("http", "fe80::1", 7480)),
    ],
)
def test_api_addresses(text: str, expected: ApiAddress) -> None:
    assert parse_api(text) == expected


@pytest.mark.parametrize(
    "text", ["ftp://x", "unix:///run/houndd.sock", "http://", "http://h:0", "http://h:x", "a b"]
)
def test_bad_api_addresses_name_the_problem(text: str) -> None:
    with pytest.raises(BadApiAddress, match="--api"):
        parse_api(text)


@pytest.mark.parametrize(
    ("body", "ctype", "expected_name"),
    [
        (b"targets: []\n", "application/yaml", "stem"),
        (b"# comment\n\ntargets: []\n", "application/yaml", "stem"),
        (b"name: given\ntargets: []\n", "application/yaml", "given"),
        (b"'name': given\ntargets: []\n", "application/yaml", "given"),
        (b'{"targets": []}', "application/json", "stem"),
        (b'{"name": "given", "targets": []}', "application/json", "given"),
        (b'{"targets": []}', "application/yaml", "stem"),  # JSON in a .yaml file
    ],
)
def test_the_plan_name_defaults_to_the_file_stem(
    body: bytes, ctype: str, expected_name: str
) -> None:
    import yaml

    out = with_default_name(body, ctype, "stem")
    doc = json.loads(out) if ctype == "application/json" else yaml.safe_load(out)
    assert doc["name"] == expected_name


@pytest.mark.parametrize(
    "body", [b"---\ntargets: []\n", b"{targets: []}\n", b"[1, 2]\n", b"targets:\n  name: x\n"]
)
def test_documents_it_cannot_extend_safely_are_sent_as_they_are(body: bytes) -> None:
    # the nested `name` is not the plan's name; the daemon will ask for one
    assert with_default_name(body, "application/yaml", "stem") in (body, b'name: "stem"\n' + body)
    if body.startswith((b"---", b"{", b"[")):
        assert with_default_name(body, "application/yaml", "stem") == body


def test_tables_never_truncate_and_draw_no_boxes() -> None:
    long = "registry.example.com:5000/" + "x" * 180 + ":1"
    lines = table(Term(io.StringIO()), ["node", "image"], [["n1", long]], no_headers=False)
    assert lines == ["NODE   IMAGE", f"n1     {long}"]


def _row(node: str, image: str, state: str, **kw: Any) -> dict[str, Any]:
    return {"node": node, "image": image, "state": state, "node_state": "alive", **kw}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_done_total_rate_eta_and_the_overall_line() -> None:
    clock, out = FakeClock(), FakeTty()
    progress = Progress(Term(out), live=True, clock=clock)
    progress.refresh({"id": "p1", "name": "warm", "items": [
        _row("n1", "img:a", "pulling", bytes_done=0, bytes_total=100 << 20),
        _row("n2", "img:a", "pending", size_bytes=100 << 20),
    ]})  # fmt: skip
    clock.now += 2.0
    pulling = _row("n1", "img:a", "pulling", bytes_done=20 << 20, bytes_total=100 << 20)
    progress.update({"event": "item", "item": pulling})
    rows = progress.rows(clock.now, max_rows=10)
    assert "20.0 MiB / 100.0 MiB" in rows[0] and "10.0 MiB/s" in rows[0] and "ETA 8.0s" in rows[0]
    overall = progress.overall(clock.now)
    assert overall.startswith("plan warm p1:") and "0/2 done, 1 pulling, 1 pending" in overall
    assert "20.0 MiB / 200.0 MiB" in overall


def test_a_dead_node_counts_down_to_node_unavailable() -> None:
    clock, out = FakeClock(), FakeTty()
    progress = Progress(Term(out), live=True, clock=clock)
    dead = _row("n2", "img:a", "pending", node_state="dead", unavailable_in_s=250.0)
    progress.refresh({"id": "p1", "items": [dead]})
    assert (
        "node dead: fails as 'node unavailable' in ~4m10s"
        in progress.rows(clock.now, max_rows=9)[0]
    )
    clock.now += 60
    assert "in ~3m10s" in progress.rows(clock.now, max_rows=9)[0]


def test_failures_are_printed_when_they_happen_even_before_dispatch() -> None:
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(Term(out), live=False, clock=clock)
    progress.refresh({"id": "p1", "items": [
        _row("n1", "img:gone", "failed", reason="manifest unknown", detail="reg/img:gone"),
        _row("n1", "img:a", "pending"),
    ]})  # fmt: skip
    progress.update({"event": "item", "item": _row("n1", "img:a", "done", bytes_total=10)})
    progress.update({"event": "item", "item": _row("n1", "img:a", "done", bytes_total=10)})
    text = out.getvalue()
    assert text.splitlines() == [
        "FAILED n1 img:gone: manifest unknown: reg/img:gone",
        "done n1 img:a (10 B)",
    ]
    assert "\x1b" not in text  # not a terminal: no colour, no cursor movement


def test_one_row_per_image_when_items_do_not_fit() -> None:
    clock = FakeClock()
    progress = Progress(Term(FakeTty()), live=True, clock=clock)
    items = [_row(f"n{i}", f"img:{i % 3}", "done" if i < 10 else "pulling",
                  bytes_done=5, bytes_total=10) for i in range(300)]  # fmt: skip
    progress.refresh({"id": "p1", "items": items})
    rows = progress.rows(clock.now, max_rows=20)
    assert len(rows) == 3
    assert rows[0].startswith("img:0   ") and "/100 done" in rows[0] and "nodes" in rows[0]
    few = progress.rows(clock.now, max_rows=2)
    assert few[-1] == "... and 2 more images"


def test_the_report_shows_every_item_with_its_error() -> None:
    lines = plan_lines(
        {"id": "p1", "name": "w", "state": "failed", "summary": {"total": 1, "failed": 1},
         "items": [_row("n1", "img:a", "failed", reason="no space", detail="disk full",
                        attempt=1)]},
        Term(io.StringIO()),
    )  # fmt: skip
    assert lines[0] == "plan p1 w: failed (0/1 done, 1 failed)"
    assert lines[2].split()[:3] == ["n1", "img:a", "failed"]
    assert lines[2].endswith("no space: disk full")


def test_the_report_says_where_each_items_bytes_came_from() -> None:
    items = [
        _row("n1", "img:a", "done", bytes_total=3 << 20, bytes_registry=3 << 20),
        _row("n2", "img:a", "done", bytes_total=3 << 20, bytes_peers=2 << 20,
             bytes_registry=1 << 20),
        _row("n3", "img:a", "done", bytes_total=3 << 20, bytes_cache=3 << 20),
        _row("n4", "img:a", "done", skipped=True),
    ]  # fmt: skip
    lines = plan_lines(
        {"id": "p1", "name": "w", "state": "done", "summary": {"total": 4, "done": 4},
         "items": items},
        Term(io.StringIO()),
    )  # fmt: skip
    header = lines[1].split()
    column = lines[1].index("FROM")
    assert header[:5] == ["NODE", "IMAGE", "STATE", "SIZE", "FROM"]
    sources = {line.split()[0]: line[column:].split("   ")[0] for line in lines[2:]}
    assert sources == {
        "n1": "registry 3.0 MiB",
        "n2": "registry 1.0 MiB, peers 2.0 MiB",
        "n3": "cache 3.0 MiB",
        "n4": "-",
    }


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("houndd st", {"status"}),
        ("houndd status --no", {"--no-headers"}),
        ("houndd status -o ", {"table", "wide", "json", "yaml"}),
        ("houndd keys ", {"list", "install", "use", "remove", "generate"}),
        ("houndd completion ", {"bash", "zsh"}),
    ],
)
def test_bash_completion_from_the_parser(words: str, expected: set[str]) -> None:
    script = completion_script(build_parser(), "bash")
    line = words.split(" ")
    probe = (
        script
        + f"COMP_WORDS=({' '.join(repr(w) for w in line)}); COMP_CWORD={len(line) - 1}\n"
        + "_houndd_complete; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    assert set(out.stdout.split()) == expected, out.stderr


def test_zsh_completion_loads_the_same_function() -> None:
    script = completion_script(build_parser(), "zsh")
    assert script.startswith("#compdef houndd\n") and "bashcompinit" in script
    assert "complete -o filenames -F _houndd_complete houndd" in script
    if shutil.which("zsh"):
        subprocess.run(["zsh", "-n", "-c", script], check=True)


class _ProblemServer:
    """A stand-in API (stdlib http.server) that answers every request with one problem: for
    answers the real daemon gives only in states that are slow to reach."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        import http.server
        import threading

        payload = json.dumps(body).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/problem+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_DELETE = do_POST = do_PUT = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.api = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_cancel_of_a_finished_plan_is_reported_not_claimed() -> None:
    server = _ProblemServer(
        409, {"type": "about:blank", "title": "plan finished", "status": 409,
              "detail": "plan p-1 is already done; nothing to cancel"},
    )  # fmt: skip
    try:
        proc = run_houndd("cancel", "p-1", "--api", server.api, "--token", "t")
    finally:
        server.close()
    assert proc.returncode == 1
    assert proc.stdout == ""  # never "cancelled"
    assert proc.stderr == (
        "houndd: plan p-1 cannot be cancelled: plan p-1 is already done; nothing to cancel\n"
    )


def test_a_server_error_is_one_readable_line() -> None:
    server = _ProblemServer(503, {"title": "no coordinator", "status": 503,
                                  "detail": "election in progress; retry shortly"})  # fmt: skip
    try:
        proc = run_houndd("plans", "--api", server.api, "--token", "t")
    finally:
        server.close()
    assert proc.returncode == 1
    assert proc.stderr == "houndd: no coordinator: election in progress; retry shortly\n"
