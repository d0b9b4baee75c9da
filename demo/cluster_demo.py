"""The README demo: the paper's Table 1 warm-up on a cluster of namespaces, end to end.

Brings up N hosts (network namespaces, each with its own dockerd) and a registry, pushes
small synthetic images named like the paper's Table 1 (image-a .. image-d), starts houndd on
every host, submits the Table 1 plan to a node that is not the coordinator with live
progress, shows the final report and `houndd status`, checks every host's dockerd, and tears
everything down. Needs root (namespaces) and the packages of `.ci/services.sh install`.

    sudo bash scripts/demo.sh                               # installs everything, then this
    sudo .venv/bin/python demo/cluster_demo.py              # 4 hosts: Table 1's first 4 rows
    sudo .venv/bin/python demo/cluster_demo.py --hosts 5    # all of Table 1
    sudo .venv/bin/python demo/cluster_demo.py --no-houndd  # stop before starting houndd
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from tests.cluster.harness import Cluster, ClusterError, ImageSpec, houndd_missing  # noqa: E402

MB = 1_000_000

# The paper's Table 1: node -> requested images.
TABLE1: dict[str, tuple[str, ...]] = {
    "n1": ("image-a", "image-b", "image-c"),
    "n2": ("image-b", "image-d"),
    "n3": ("image-a", "image-d"),
    "n4": ("image-b", "image-c", "image-d"),
    "n5": ("image-a", "image-b", "image-c", "image-d"),
}
IMAGES = (
    ImageSpec("image-a", 3 * MB, tag="1.0", layers=2, seed=101),
    ImageSpec("image-b", 5 * MB, tag="1.0", layers=2, seed=102),
    ImageSpec("image-c", 2 * MB, tag="1.0", layers=1, seed=103),
    ImageSpec("image-d", 8 * MB, tag="1.0", layers=3, seed=104),
)


def say(text: str, why: str = "") -> None:
    """A step header, and in plain words what it does and why."""
    print(f"\n==> {text}", flush=True)
    if why:
        for line in textwrap.wrap(why, 88):
            print(f"    {line}")


def table1_plan(cluster: Cluster, nodes: Sequence[str]) -> dict[str, object]:
    """Table 1 restricted to the hosts we have, in houndd's paper form (node -> images)."""
    tags = {i.name: i.tag for i in IMAGES}
    return {
        "name": "table-1",
        "nodes": {n: [cluster.image_ref(img, tags[img]) for img in TABLE1[n]] for n in nodes},
        "policy": {"parallelism": 10, "per_node_parallelism": 3},
    }


def groups(requests: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The paper's Table 2: image -> nodes requesting it."""
    out: dict[str, list[str]] = {}
    for node, images in requests.items():
        for image in images:
            out.setdefault(image, []).append(node)
    return dict(sorted(out.items()))


def wait_for_coordinator(cluster: Cluster, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            name = cluster.coordinator("n1")
        except ClusterError:
            name = None
        if name:
            return name
        time.sleep(0.5)
    raise ClusterError(
        f"no coordinator after {timeout_s:.0f} s; n1 log:\n{cluster.houndd_log_tail('n1')}"
    )


def run(cluster: Cluster, *, start_houndd: bool) -> int:
    nodes = [h.name for h in cluster.hosts]
    for h in cluster.hosts:
        print(f"    {h.name}: {h.address} (namespace {h.netns}), dockerd {h.docker_host}")
    print(f"    registry: {cluster.registry_address} (namespace {cluster.registry_netns})")

    say(
        "pushing Table 1's images to the registry (synthetic, incompressible)",
        "Each host will pull these from the registry namespace over the bridge, like Docker "
        "hosts pulling from a LAN registry. Random bytes so nothing compresses away.",
    )
    digests = cluster.push_images(IMAGES)
    for spec in IMAGES:
        ref = cluster.image_ref(spec.name, spec.tag)
        print(f"    {ref}  {spec.size_bytes / MB:.0f} MB  {digests[spec.name][:19]}...")

    plan = table1_plan(cluster, nodes)
    plan_path = cluster.workdir / "table1.yaml"
    plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
    say(
        f"the plan (Table 1), written to {plan_path}",
        "A plan names which node needs which images. houndd groups the nodes per image "
        "(Table 2), resolves each tag once to a digest, and pulls everywhere in parallel.",
    )
    print(plan_path.read_text())
    print("    classification (the paper's Table 2):")
    for image, members in groups({n: TABLE1[n] for n in nodes}).items():
        print(f"      {image}: {', '.join(members)}")

    if not start_houndd:
        say("stopping before houndd (--no-houndd)")
        return 0
    missing = houndd_missing()
    if missing is not None:
        say(f"{missing}: stopping here")
        return 0

    say(
        "starting houndd on every host (houndd init, then houndd run in the host's namespace)",
        "Every host runs the same daemon with the same cluster key. They find each other "
        "(mDNS and seeds), check liveness by gossip (SWIM) and elect one coordinator.",
    )
    for h in cluster.hosts:
        cluster.start_houndd(h, wait_ready=False)
    for h in cluster.hosts:
        cluster.wait_houndd_ready(h)
        print(f"    {h.name}: houndd answers on {h.api_url}")
    coordinator = wait_for_coordinator(cluster)
    entry = next((n for n in nodes if n != coordinator), nodes[0])
    print(f"    coordinator: {coordinator}; submitting through {entry}")

    say(
        f"houndd submit table1.yaml --wait   (on {entry})",
        f"Submitted to {entry}, which is not the coordinator: any node accepts a plan, "
        f"stores and replicates it, and forwards it to {coordinator}, which dispatches the "
        "pulls. --wait follows progress until every item is done or failed.",
    )
    submit = cluster.houndd(entry, "submit", str(plan_path), "--wait", capture=False, timeout=600)

    say(
        f"houndd status   (on {entry})",
        "The member table every node keeps; ROLE shows the coordinator.",
    )
    cluster.houndd(entry, "status", capture=False, timeout=60)

    say(
        "checking every host's own dockerd",
        "Not trusting houndd's report: ask each host's dockerd for the pushed digests.",
    )
    ok = True
    for n in nodes:
        have = cluster.image_digests(n)
        for img in TABLE1[n]:
            want = f"{cluster.registry_address}/{img}@{digests[img]}"
            present = want in have
            ok &= present
            print(f"    {n}: {img} {'present' if present else 'MISSING'}")
    print(f"\n    submit exited {submit.returncode}; images {'all present' if ok else 'MISSING'}")
    return 0 if ok and submit.returncode == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--hosts", type=int, default=4, choices=range(2, 6), help="2..5 (default 4)")
    p.add_argument("--no-houndd", action="store_true", help="stop after pushing the images")
    p.add_argument("--host-mbit", type=float, default=None, help="shape each host's ingress")
    p.add_argument("--registry-mbit", type=float, default=None, help="shape the registry's egress")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: temp)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hd-demo-", dir="/var/tmp") as tmp:
        workdir = args.workdir or Path(tmp)
        say(
            f"creating {args.hosts} hosts and a registry in network namespaces (work dir {workdir})"
        )
        cluster = Cluster(
            args.hosts,
            workdir=workdir,
            registry_egress_mbit=args.registry_mbit,
            host_ingress_mbit=args.host_mbit,
        )
        try:
            cluster.start()
            return run(cluster, start_houndd=not args.no_houndd)
        finally:
            say("tearing down (processes, namespaces, links, bridge)")
            cluster.teardown()
            print("    done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
