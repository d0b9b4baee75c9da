"""`/metrics` by Prometheus conventions: promtool accepts it, counters end in `_total`, units
are suffixes, the node's identity and health are there (build info, coordinator role, engine
up), and items that failed before any node pulled (an image the registry lacks) count as failed.
"""

from __future__ import annotations

import shutil
import subprocess
from platform import python_version

import pytest
from prometheus_client.parser import text_string_to_metric_families

from houndd import __version__
from tests.api.harness import RunningDaemon, sample, scrape

UNIT_WORDS = ("bytes", "seconds")


def _text(node: RunningDaemon) -> str:
    resp = node.request("GET", "/metrics", token=None)
    assert resp.status_code == 200
    return resp.text


def test_items_that_failed_before_dispatch_count_as_failed(node: RunningDaemon) -> None:
    before = sample(scrape(node), "houndd_items", state="failed")
    # not on loopback: the test registry guard fails its resolution, as a missing image would
    plan = {"name": "unresolvable", "targets": [{"images": ["registry.invalid/x:1"], "all": True}]}
    submitted = node.submit(plan)
    assert submitted["unresolved"], submitted
    metrics = scrape(node)
    assert sample(metrics, "houndd_items", state="failed") == before + 1
    assert sample(metrics, "houndd_plans", state="failed") >= 1


def test_identity_role_and_engine_health(node: RunningDaemon) -> None:
    metrics = scrape(node)
    assert sample(metrics, "houndd_build_info", version=__version__, python=python_version()) == 1
    assert sample(metrics, "houndd_is_coordinator") == 1  # a single node coordinates itself
    assert sample(metrics, "houndd_engine_up") == 1


def test_names_follow_prometheus_conventions(node: RunningDaemon) -> None:
    families = list(text_string_to_metric_families(_text(node)))
    names = {f.name: f.type for f in families}
    assert names["houndd_peer_messages_refused"] == "counter"  # exposed as ..._total
    assert "houndd_pulled_bytes" in names and "houndd_bytes_pulled" not in names
    for family in families:
        if family.name.endswith("_created") and family.name.removesuffix("_created") in names:
            continue  # a counter's or histogram's creation time, which the parser splits off
        assert family.name.startswith("houndd_"), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            for s in family.samples:
                assert s.name.endswith(("_total", "_created")), s.name
        for word in UNIT_WORDS:
            if word in family.name:
                # the unit is the suffix (before _total/_count/... that the type adds)
                assert family.name.endswith(f"_{word}"), family.name


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool (Debian package prometheus) is not installed; .ci/services.sh installs it",
)
def test_promtool_accepts_the_exposition(node: RunningDaemon) -> None:
    proc = subprocess.run(
        ["promtool", "check", "metrics"],
        input=_text(node),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr
