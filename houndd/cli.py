"""`houndd`: one entry point, subcommands for the daemon and for operators.

Exit codes: 0 success; 1 the operation finished but something failed (a plan item, a node in
a key operation); 2 usage or configuration error; 3 the daemon's API is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from houndd import __version__
from houndd.client import ApiError, Client, Unreachable
from houndd.config import Config, load
from houndd.errors import ConfigError, HounddError, KeyFileError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3

log = logging.getLogger("houndd.cli")


# --- logging ---------------------------------------------------------------------------------


class KeyValueFormatter(logging.Formatter):
    """`ts level logger message` with key=value context already inside the message."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        stamp = f"{ts}.{int(record.msecs):03d}Z"
        base = f"{stamp} {record.levelname:<7} {record.name} {record.getMessage()}"
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # library chatter is not houndd's story
    for noisy in ("aiohttp.access", "zeroconf", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --- config and client helpers -----------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("node_name", "state_dir", "bind", "port", "advertise", "preset", "docker_host")
    out: dict[str, Any] = {k: getattr(args, k, None) for k in keys}
    if getattr(args, "seed", None):
        out["seeds"] = tuple(args.seed)
    if getattr(args, "no_mdns", False):
        out["mdns"] = False
    if getattr(args, "label", None):
        out["labels"] = dict(_parse_label(s) for s in args.label)
    return {k: v for k, v in out.items() if v is not None}


def _parse_label(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise ConfigError("labels", f"expected key=value, got {text!r}")
    return k, v


def _config(args: argparse.Namespace) -> Config:
    return load(getattr(args, "config", None), overrides=_overrides(args))


def _api_url(args: argparse.Namespace, config: Config) -> str:
    if args.api:
        return str(args.api)
    if os.environ.get("HOUNDD_API"):
        return os.environ["HOUNDD_API"]
    host = config.advertise or (
        "127.0.0.1" if config.bind in ("0.0.0.0", "::", "") else config.bind
    )
    scheme = "https" if config.tls_cert_file else "http"
    return f"{scheme}://{host}:{config.port}"


def _token(args: argparse.Namespace, config: Config) -> str | None:
    if getattr(args, "token", None):
        return str(args.token)
    if os.environ.get("HOUNDD_TOKEN"):
        return os.environ["HOUNDD_TOKEN"]
    from houndd.wire.keyring import Keyring, derive_api_token

    path = config.cluster_key_path
    if not path.exists():
        return None
    return derive_api_token(Keyring.load(path).primary)


def _client(args: argparse.Namespace) -> Client:
    config = _config(args)
    return Client(_api_url(args, config), _token(args, config))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# --- commands -----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from houndd.keyfiles import read_secret, write_secret
    from houndd.wire.keyring import Keyring
    from houndd.wire.signing import NodeIdentity

    config = _config(args)
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state, 0o700)

    if config.identity_key_path.exists():
        identity = NodeIdentity.load(config.identity_key_path)
        print(f"identity key exists: {config.identity_key_path}")
    else:
        identity = NodeIdentity.generate()
        identity.save(config.identity_key_path)
        print(f"created identity key {config.identity_key_path} (node id {identity.node_id})")

    key_path = config.cluster_key_path
    if args.join_key_file:
        source = Path(args.join_key_file)
        data = read_secret(source)
        Keyring.load(source)  # validates the format before we copy it
        if source.resolve() != key_path.resolve():
            write_secret(key_path, data)
        print(f"joined: cluster key installed at {key_path}")
    elif key_path.exists():
        Keyring.load(key_path)
        print(f"cluster key exists: {key_path}")
    else:
        ring = Keyring.generate()
        ring.save(key_path)
        print(f"created a new cluster key: {key_path}")
        print("to add another host, copy this file to it (mode 0600) and run there:")
        print(f"  houndd init --join-key-file {key_path}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from houndd.daemon import Daemon

    config = _config(args)
    configure_logging(config.log_level)
    daemon = Daemon(config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop, sig.name)
        await daemon.run()

    try:
        asyncio.run(main())
    except KeyFileError as e:
        log.error("refusing to start: %s", e)
        print(f"houndd: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from houndd.render import render_cluster

    async def go() -> dict[str, Any]:
        async with _client(args) as c:
            data: dict[str, Any] = await c.get("/v1/cluster")
            return data

    data = asyncio.run(go())
    if args.json:
        _print_json(data)
    else:
        render_cluster(data)
    return EXIT_OK


def _read_plan_file(path: str) -> tuple[bytes, str]:
    if path == "-":
        body = sys.stdin.buffer.read()
    else:
        try:
            body = Path(path).read_bytes()
        except OSError as e:
            raise HounddError(f"cannot read plan file {path}: {e.strerror}") from None
    ctype = "application/json" if path.endswith(".json") else "application/yaml"
    return body, ctype


async def _submit(client: Client, body: bytes, ctype: str) -> dict[str, Any]:
    result: dict[str, Any] = await client.request(
        "POST", "/v1/plans", data=body, content_type=ctype
    )
    return result


def _plan_exit_code(plan: dict[str, Any]) -> int:
    return EXIT_OK if plan.get("state") == "done" else EXIT_FAILED


FINAL_STATES = ("done", "failed", "cancelled")


async def _wait(client: Client, plan_id: str, *, live: bool) -> dict[str, Any]:
    """Follow the plan's events until it is final. A stream that ends early (the node
    restarted, a proxy cut it) is opened again; a plan is never reported before it is final."""
    from houndd.render import PlanProgress

    progress = PlanProgress(enabled=live)
    with progress:
        while True:
            try:
                async for event in client.events(plan_id):
                    progress.update(event)
                    if event.get("event") == "final":
                        return dict(event["plan"])
            except Unreachable:
                pass
            plan: dict[str, Any] = await client.get(f"/v1/plans/{plan_id}")
            if plan.get("state") in FINAL_STATES:
                return plan
            await asyncio.sleep(1.0)


def _run_submission(args: argparse.Namespace, body: bytes, ctype: str, *, wait: bool) -> int:
    """Submit a plan; with `wait`, follow it to the end and exit by its outcome."""
    from houndd.render import render_plan, render_submit

    async def go() -> int:
        async with _client(args) as c:
            accepted = await _submit(c, body, ctype)
            if not args.json:
                render_submit(accepted)
            if not wait:
                if args.json:
                    _print_json(accepted)
                return EXIT_OK
            final = await _wait(c, accepted["id"], live=not args.json and sys.stderr.isatty())
            if args.json:
                _print_json(final)
            else:
                render_plan(final)
            return _plan_exit_code(final)

    return asyncio.run(go())


def cmd_submit(args: argparse.Namespace) -> int:
    body, ctype = _read_plan_file(args.file)
    return _run_submission(args, body, ctype, wait=args.wait)


def _op_plan(args: argparse.Namespace, action: str) -> int:
    """`houndd remove IMAGE...` and `houndd prune`: a one-target plan, followed to the end."""
    if not args.all and not args.nodes:
        raise ConfigError("--nodes", "name nodes with --nodes N1 N2 ... or use --all")
    target: dict[str, Any] = {"all": True} if args.all else {"nodes": list(args.nodes)}
    doc: dict[str, Any] = {
        "name": f"{action}-{int(time.time())}",
        "action": action,
        "targets": [{**target, "images": list(args.images)}],
    }
    return _run_submission(args, json.dumps(doc).encode(), "application/json", wait=True)


def cmd_plans(args: argparse.Namespace) -> int:
    from houndd.render import render_plans

    async def go() -> Any:
        async with _client(args) as c:
            return await c.get("/v1/plans")

    data = asyncio.run(go())
    if args.json:
        _print_json(data)
    else:
        render_plans(data["plans"])
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from houndd.render import render_plan

    async def go() -> Any:
        async with _client(args) as c:
            return await c.get(f"/v1/plans/{args.id}")

    data = asyncio.run(go())
    if args.json:
        _print_json(data)
    else:
        render_plan(data)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    async def go() -> Any:
        async with _client(args) as c:
            return await c.request("DELETE", f"/v1/plans/{args.id}")

    data = asyncio.run(go())
    if args.json:
        _print_json(data)
    else:
        print(f"plan {args.id}: {data.get('state', 'cancelled')}")
    return EXIT_OK


def cmd_label(args: argparse.Namespace) -> int:
    labels: dict[str, str | None] = {}
    for item in args.labels:
        if item.endswith("-") and "=" not in item:
            labels[item[:-1]] = None
        else:
            k, v = _parse_label(item)
            labels[k] = v

    async def go() -> Any:
        async with _client(args) as c:
            return await c.request(
                "PUT", f"/v1/nodes/{args.node}/labels", json_body={"labels": labels}
            )

    data = asyncio.run(go())
    if args.json:
        _print_json(data)
    else:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(data.get("labels", {}).items()))
        print(f"{args.node}: {shown or '(no labels)'}")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from houndd.render import render_keys

    if args.op == "generate":
        print(base64.b64encode(os.urandom(32)).decode())
        return EXIT_OK
    if args.op != "list" and not args.key:
        raise ConfigError("key", f"`houndd keys {args.op}` needs a base64 key")

    async def go() -> Any:
        async with _client(args) as c:
            if args.op == "list":
                return await c.get("/v1/keys")
            return await c.request("POST", "/v1/keys", json_body={"op": args.op, "key": args.key})

    data = asyncio.run(go())
    if args.json:
        _print_json(data)
    else:
        render_keys(args.op, data)
    failed = [n for n, r in data.get("nodes", {}).items() if r.get("error")]
    return EXIT_FAILED if failed else EXIT_OK


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="houndd", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    p.add_argument("--version", action="version", version=f"houndd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, *, client: bool = True) -> None:
        sp.add_argument(
            "--config", help="TOML config file (default: $HOUNDD_CONFIG or /etc/houndd/houndd.toml)"
        )
        sp.add_argument("--state-dir", dest="state_dir")
        if client:
            sp.add_argument(
                "--api", help="http://host:port of any node (default: the local daemon)"
            )
            sp.add_argument(
                "--token", help="API bearer token (default: derived from the cluster key)"
            )
            sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("init", help="create the state directory, identity key and cluster key")
    common(sp, client=False)
    sp.add_argument("--join-key-file", help="join an existing cluster with this key file")
    sp.set_defaults(func=cmd_init)

    sp = sub.add_parser("run", help="run the daemon")
    common(sp, client=False)
    sp.add_argument("--node-name", dest="node_name")
    sp.add_argument("--bind")
    sp.add_argument("--port", type=int)
    sp.add_argument("--advertise")
    sp.add_argument("--preset", choices=["lan", "local"])
    sp.add_argument("--docker-host", dest="docker_host")
    sp.add_argument("--seed", action="append", help="host:port of a peer (repeatable)")
    sp.add_argument("--no-mdns", action="store_true")
    sp.add_argument("--label", action="append", help="key=value (repeatable)")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("status", help="members, coordinator, term, labels, health")
    common(sp)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("submit", help="submit a plan (YAML or JSON file, - for stdin)")
    common(sp)
    sp.add_argument("file")
    sp.add_argument(
        "--wait", action="store_true", help="follow progress; exit 0 only if all succeeded"
    )
    sp.set_defaults(func=cmd_submit)

    for action in ("remove", "prune"):
        sp = sub.add_parser(action, help=f"{action} images on nodes (a {action} plan)")
        common(sp)
        if action == "remove":
            sp.add_argument("images", nargs="+")
        else:
            sp.set_defaults(images=[])
        sp.add_argument("--nodes", nargs="+")
        sp.add_argument("--all", action="store_true")
        sp.set_defaults(func=lambda a, _act=action: _op_plan(a, _act))

    sp = sub.add_parser("plans", help="list plans")
    common(sp)
    sp.set_defaults(func=cmd_plans)

    sp = sub.add_parser("plan", help="show one plan: per node x image state")
    common(sp)
    sp.add_argument("id")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("cancel", help="cancel a plan: stop dispatching, abort in-flight pulls")
    common(sp)
    sp.add_argument("id")
    sp.set_defaults(func=cmd_cancel)

    sp = sub.add_parser("label", help="set (k=v) or remove (k-) labels of a node")
    common(sp)
    sp.add_argument("node")
    sp.add_argument("labels", nargs="+")
    sp.set_defaults(func=cmd_label)

    sp = sub.add_parser("keys", help="cluster keyring: list | install | use | remove | generate")
    common(sp)
    sp.add_argument("op", choices=["list", "install", "use", "remove", "generate"])
    sp.add_argument("key", nargs="?")
    sp.set_defaults(func=cmd_keys)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as e:
        print(f"houndd: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyFileError as e:
        print(f"houndd: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as e:
        print(f"houndd: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ApiError as e:
        print(f"houndd: {e}", file=sys.stderr)
        return EXIT_USAGE if 400 <= e.status < 500 else EXIT_FAILED
    except HounddError as e:
        print(f"houndd: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
