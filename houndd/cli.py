"""`houndd`: one entry point, subcommands for the daemon and for operators.

Exit codes: 0 success; 1 the operation ran but something failed (a plan item, a node in a key
operation, a plan accepted with images or nodes it cannot serve); 2 usage or configuration
error (bad arguments, config, plan file, a request the API refused as invalid or
unauthorized); 3 the daemon's API is unreachable; 130 interrupted (Ctrl-C).

Start-up time matters (scripts call `houndd status --json` in loops): this module imports only
the standard library and small houndd modules at the top; everything heavier (the daemon,
PyYAML, NaCl) is imported by the one command that needs it.
"""

from __future__ import annotations

import os
import sys

from houndd import __version__
from houndd.errors import ConfigError, HounddError, KeyFileError

# Even `typing`, `json`, `argparse` and `pathlib` cost milliseconds at start-up; the commands
# import what they use, and the annotations below are never evaluated (PEP 563).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from types import ModuleType
    from typing import Any

    from houndd.client import Client
    from houndd.config import Config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130

FINAL_STATES = ("done", "failed", "cancelled")
OUTPUTS = ("table", "wide", "json", "yaml")


class UsageError(HounddError, ValueError):
    """The command line is wrong (not the config, not the cluster); exit code 2."""


class Interrupted(HounddError):
    """Ctrl-C while following a plan; the message says how to pick it up again."""


# --- config and client ---------------------------------------------------------------------


def _label_arg(text: str) -> tuple[str, str]:
    """argparse type of `--label key=value`."""
    import argparse

    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return k, v


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "node_name",
        "state_dir",
        "bind",
        "port",
        "advertise",
        "preset",
        "docker_host",
        "log_format",
    )
    out: dict[str, Any] = {k: getattr(args, k, None) for k in keys}
    if getattr(args, "seed", None):
        out["seeds"] = tuple(args.seed)
    if getattr(args, "no_mdns", False):
        out["mdns"] = False
    if getattr(args, "label", None):
        out["labels"] = dict(args.label)
    return {k: v for k, v in out.items() if v is not None}


def _config(args: argparse.Namespace) -> Config:
    from houndd.config import load

    return load(getattr(args, "config", None), overrides=_overrides(args))


def _api(args: argparse.Namespace, config: Config | None) -> str:
    if args.api:
        return str(args.api)
    if os.environ.get("HOUNDD_API"):
        return os.environ["HOUNDD_API"]
    assert config is not None
    host = config.advertise or (
        "127.0.0.1" if config.bind in ("0.0.0.0", "::", "") else config.bind
    )
    scheme = "https" if config.tls_cert_file else "http"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    return f"{scheme}://{host}:{config.port}"


def _token(args: argparse.Namespace, config: Config | None) -> str | None:
    if getattr(args, "token", None):
        return str(args.token)
    if os.environ.get("HOUNDD_TOKEN"):
        return os.environ["HOUNDD_TOKEN"]
    assert config is not None
    path = config.cluster_key_path
    if not path.exists():
        return None
    # the key file format without NaCl: this runs on every CLI call
    from houndd.keyfiles import derive_api_token, read_cluster_keys

    try:
        return derive_api_token(read_cluster_keys(path)[0])
    except KeyFileError as e:
        raise KeyFileError(f"{e}; or pass --token (HOUNDD_TOKEN)") from None


def _client(args: argparse.Namespace) -> Client:
    from houndd.client import Client, parse_api

    have_api = bool(args.api or os.environ.get("HOUNDD_API"))
    have_token = bool(getattr(args, "token", None) or os.environ.get("HOUNDD_TOKEN"))
    # With both given, the config (and its key) is not needed: a workstation has neither.
    config = None if have_api and have_token else _config(args)
    token = _token(args, config)
    hint = None
    if token is None:
        assert config is not None
        hint = (
            f"no cluster key at {config.cluster_key_path} to derive the API token from: run this "
            f"on a node as root (sudo), point --config at the node's config, or pass --token"
        )
    return Client(parse_api(_api(args, config)), token, unauthorized_hint=hint)


def _output(args: argparse.Namespace) -> str:
    return "json" if getattr(args, "json", False) else str(getattr(args, "output", "table"))


def _emit(data: Any, fmt: str) -> None:
    """Structured output for scripts: JSON, or YAML (PyYAML loaded only for it)."""
    if fmt == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        import json

        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _print(lines: Sequence[str]) -> None:
    from houndd.render import write_lines

    write_lines(lines)


def _warn(text: str) -> None:
    print(f"houndd: {text}", file=sys.stderr)


def _term(stream: Any) -> Any:
    from houndd.render import Term

    return Term(stream)


# --- commands: the node ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from houndd.keyfiles import read_cluster_keys, read_secret, write_secret
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
        if not source.is_file():
            raise UsageError(f"--join-key-file {source}: no such file")
        data = read_secret(source)
        new_keys = read_cluster_keys(source)  # validates the format before anything is copied
        same_file = key_path.exists() and source.resolve() == key_path.resolve()
        if key_path.exists() and not same_file:
            old_keys = read_cluster_keys(key_path)
            if old_keys[0] != new_keys[0] and not args.force:
                raise UsageError(
                    f"{key_path} already holds a different cluster key; replacing it moves this "
                    f"node to another cluster. Pass --force to replace it."
                )
        if not same_file:
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
    import asyncio
    import logging
    import signal

    from houndd.daemon import Daemon
    from houndd.logs import configure_logging

    config = _config(args)
    configure_logging(config.log_level, config.log_format)
    daemon = Daemon(config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop, sig.name)
        await daemon.run()

    try:
        asyncio.run(main())
    except KeyFileError as e:
        logging.getLogger("houndd.cli").error("refusing to start: %s", e)
        print(f"houndd: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


# --- commands: reading the cluster ------------------------------------------------------------


def _show(
    args: argparse.Namespace, data: Any, table: Callable[[ModuleType], Callable[..., list[str]]]
) -> int:
    """Print `data` as -o asks: json/yaml as it came, else as the table `table(render)` makes
    (render, with its imports, is loaded only then)."""
    fmt = _output(args)
    if fmt in ("json", "yaml"):
        _emit(data, fmt)
        return EXIT_OK
    from houndd import render

    lines = table(render)(
        data,
        _term(sys.stdout),
        wide=fmt == "wide",
        no_headers=getattr(args, "no_headers", False),
    )
    _print(lines)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        return _show(args, c.get("/v1/cluster"), lambda r: r.cluster_lines)


def cmd_plans(args: argparse.Namespace) -> int:
    with _client(args) as c:
        return _show(args, c.get("/v1/plans"), lambda r: r.plans_lines)


def cmd_plan(args: argparse.Namespace) -> int:
    with _client(args) as c:
        plan = c.get(f"/v1/plans/{_plan_id(args.id)}")
        if args.follow and plan.get("state") not in FINAL_STATES:
            try:
                plan = _follow(c, plan["id"], args)
            except KeyboardInterrupt:
                raise _still_running(plan["id"]) from None
    _report(plan, args)
    return _plan_exit_code(plan) if args.follow else EXIT_OK


def _plan_id(text: str) -> str:
    if not text or "/" in text or any(c.isspace() for c in text):
        raise UsageError(f"{text!r} is not a plan id (see `houndd plans`)")
    return text


def _report(plan: dict[str, Any], args: argparse.Namespace) -> None:
    _show(args, plan, lambda r: r.plan_lines)


def _plan_exit_code(plan: dict[str, Any]) -> int:
    return EXIT_OK if plan.get("state") == "done" else EXIT_FAILED


# --- following a plan ----------------------------------------------------------------------------

# When no event arrives: redraw this often on a terminal, and fetch the whole view every few
# silent ticks (it carries what events do not: a target node dying).
LIVE_TICK_S = 1.0
PLAIN_TICK_S = 5.0
REFRESH_EVERY_TICKS = 5
RECONNECT_PAUSE_S = 1.0
MAX_RECONNECTS = 30


def _follow(client: Client, plan_id: str, args: argparse.Namespace) -> dict[str, Any]:
    """Show the plan's progress until it is final and return its final view. A stream that ends
    early (the node restarted, a proxy cut it) is opened again. Ctrl-C propagates: the caller
    says the plan keeps running and how to follow or cancel it (`_still_running`)."""
    import time

    from houndd.client import Unreachable
    from houndd.render import Progress

    fmt = _output(args)
    quiet = fmt in ("json", "yaml") or getattr(args, "quiet", False)
    progress = Progress(_term(sys.stderr), live=not quiet and sys.stderr.isatty())
    tick_s = LIVE_TICK_S if progress.live else PLAIN_TICK_S
    failures = 0
    try:
        while True:
            try:
                ticks = 0
                for event in client.events(plan_id, read_timeout_s=tick_s):
                    failures = 0
                    if event is None:
                        ticks += 1
                        if quiet:
                            continue
                        if ticks % REFRESH_EVERY_TICKS == 0:
                            progress.refresh(client.get(f"/v1/plans/{plan_id}"))
                        else:
                            progress.tick()
                        continue
                    if not quiet:
                        progress.update(event)
                    if event.get("event") == "final" and isinstance(event.get("plan"), dict):
                        # the final event carries the plan without its items: the whole of
                        # it for the report
                        return dict(client.get(f"/v1/plans/{plan_id}"))
                # the stream ended without the final view: it may be final anyway
                plan: dict[str, Any] = client.get(f"/v1/plans/{plan_id}")
                if plan.get("state") in FINAL_STATES:
                    return plan
            except Unreachable:
                # the node restarted or a proxy cut the stream: try again for a while
                failures += 1
                if failures > MAX_RECONNECTS:
                    raise
            time.sleep(RECONNECT_PAUSE_S)
    finally:
        progress.close()


def _still_running(plan_id: str) -> Interrupted:
    return Interrupted(
        f"stopped following plan {plan_id}; it keeps running on the cluster.\n"
        f"  follow it again: houndd plan {plan_id} --follow\n"
        f"  cancel it:       houndd cancel {plan_id}"
    )


# --- commands: plans -----------------------------------------------------------------------


def _read_plan_file(path: str) -> tuple[bytes, str]:
    from pathlib import Path

    if path == "-":
        body = sys.stdin.buffer.read()
    else:
        try:
            body = Path(path).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read plan file {path}: {e.strerror}") from None
    ctype = "application/json" if path.endswith(".json") else "application/yaml"
    return body, ctype


def _default_name(path: str) -> str:
    from pathlib import Path

    return "stdin" if path == "-" else Path(path).stem


def with_default_name(body: bytes, content_type: str, name: str) -> bytes:
    """The plan document with `name:` added when it has none (the file's stem is the name).

    JSON is decoded and encoded again; YAML gets a first line, which is only valid for a block
    mapping, so flow-style or multi-document YAML without a name is sent unchanged (and the
    daemon asks for the name). PyYAML is not loaded for this: `submit` must start fast.
    """
    import json

    if content_type == "application/json" or body.lstrip().startswith(b"{"):
        try:
            doc = json.loads(body)
        except ValueError:
            return body  # the daemon names the error with its position
        if isinstance(doc, dict) and "name" not in doc:
            return json.dumps({"name": name, **doc}).encode()
        return body
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        return body
    meaningful = [
        line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    if not meaningful or meaningful[0].startswith(("{", "[", "%", "---", "-", " ", "\t")):
        return body
    for line in meaningful:
        key = line.split(":", 1)[0].strip().strip("'\"")
        if not line.startswith((" ", "\t")) and key == "name":
            return body
    return (f"name: {json.dumps(name)}\n" + text).encode()


def _submit(args: argparse.Namespace, body: bytes, ctype: str, *, wait: bool) -> int:
    """Submit a plan; print its id (stdout) and what it cannot serve (stderr); with `wait`,
    follow it to the end and exit by its outcome."""
    from houndd.render import no_space_notes, submit_notes, submit_problems

    fmt = _output(args)
    structured = fmt in ("json", "yaml")
    with _client(args) as c:
        accepted = c.request("POST", "/v1/plans", data=body, content_type=ctype)
        try:
            # while following, items of unresolved images are reported failed like any other
            info, problems = submit_notes(accepted, with_unresolved=not wait)
            problems += no_space_notes(accepted) if not wait else []
            if not structured:
                print(accepted["id"], flush=True)
                for line in info:
                    print(line, file=sys.stderr)
            for problem in problems:
                _warn(f"warning: {problem}")
            if not wait:
                if structured:
                    _emit(accepted, fmt)
                return EXIT_FAILED if submit_problems(accepted) else EXIT_OK
            final = _follow(c, accepted["id"], args)
        except KeyboardInterrupt:
            # accepted means it runs: say so, whenever the interrupt came
            raise _still_running(accepted["id"]) from None
    if structured:
        _emit(final, fmt)
    else:
        _report(final, args)
    return EXIT_FAILED if submit_problems(accepted) else _plan_exit_code(final)


def cmd_submit(args: argparse.Namespace) -> int:
    body, ctype = _read_plan_file(args.file)
    body = with_default_name(body, ctype, _default_name(args.file))
    if args.dry_run:
        if args.wait:
            raise UsageError("--dry-run stores nothing, so there is nothing to --wait for")
        return _dry_run(args, body, ctype)
    return _submit(args, body, ctype, wait=args.wait)


def _dry_run(args: argparse.Namespace, body: bytes, ctype: str) -> int:
    """What the plan would do on each target (images it lacks, bytes to transfer, whether its
    free disk suffices); exit 1 if anything would fail or be skipped."""
    from houndd.render import submit_notes, submit_problems

    with _client(args) as c:
        preview = c.request("POST", "/v1/plans?dry_run=true", data=body, content_type=ctype)
    _, problems = submit_notes({"id": "(dry run)", **preview})
    for problem in problems:
        _warn(f"warning: {problem}")
    _show(args, preview, lambda r: r.preview_lines)
    return EXIT_FAILED if submit_problems(preview) else EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    """Offline: parse and validate the plan, print the groups it would form. No daemon."""
    from houndd.coordinator.classify import classify
    from houndd.coordinator.plan import parse_plan
    from houndd.errors import PlanError
    from houndd.render import selector_text

    body, ctype = _read_plan_file(args.file)
    body = with_default_name(body, ctype, _default_name(args.file))
    try:
        spec = parse_plan(body, fmt="json" if ctype == "application/json" else None)
    except PlanError as e:
        print(f"{args.file}: invalid plan: {e}", file=sys.stderr)
        return EXIT_USAGE
    requests: dict[str, list[str]] = {}
    for target in spec.targets:
        if target.nodes is not None:
            who = list(target.nodes)
        elif target.selector is not None:
            who = [f"(nodes with {selector_text(target.selector)})"]
        else:
            who = ["(all members)"]
        for node in who:
            requests.setdefault(node, []).extend(target.images or ["(prune)"])
    for node, images in spec.node_images.items():
        requests.setdefault(node, []).extend(images or ["(prune)"])
    groups = classify(requests)
    if _output(args) in ("json", "yaml"):
        _emit(
            {
                "valid": True,
                "name": spec.name,
                "action": spec.action,
                "policy": spec.policy.to_document(),
                "groups": [{"image": g.image, "nodes": list(g.nodes)} for g in groups],
            },
            _output(args),
        )
        return EXIT_OK
    print(f"{args.file}: valid {spec.action} plan {spec.name!r}, {len(groups)} groups")
    for g in groups:
        print(f"  group {g.image} -> {', '.join(g.nodes)}")
    return EXIT_OK


def _op_plan(args: argparse.Namespace, action: str) -> int:
    """`houndd remove IMAGE...` and `houndd prune`: a one-target plan, followed to the end."""
    import json
    import time

    if not args.all and not args.nodes:
        raise UsageError("name nodes with --nodes N1 N2 ... or use --all")
    target: dict[str, Any] = {"all": True} if args.all else {"nodes": list(args.nodes)}
    doc: dict[str, Any] = {
        "name": f"{action}-{int(time.time())}",
        "action": action,
        "targets": [{**target, "images": list(args.images)}],
    }
    return _submit(args, json.dumps(doc).encode(), "application/json", wait=True)


def cmd_cancel(args: argparse.Namespace) -> int:
    from houndd.client import ApiError

    plan_id = _plan_id(args.id)
    with _client(args) as c:
        try:
            data = c.request("DELETE", f"/v1/plans/{plan_id}")
        except ApiError as e:
            if e.status == 409:
                _warn(f"plan {plan_id} cannot be cancelled: {e.detail or e.title}")
                return EXIT_FAILED
            raise
    if _output(args) in ("json", "yaml"):
        _emit(data, _output(args))
    else:
        print(f"plan {plan_id}: {data.get('state', 'cancelled')}")
    return EXIT_OK


def cmd_label(args: argparse.Namespace) -> int:
    labels: dict[str, str | None] = {}
    for item in args.labels:
        if item.endswith("-") and "=" not in item:
            labels[item[:-1]] = None
            continue
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"expected key=value (set) or key- (remove), got {item!r}")
        labels[k] = v
    with _client(args) as c:
        data = c.request("PUT", f"/v1/nodes/{args.node}/labels", json_body={"labels": labels})
    if _output(args) in ("json", "yaml"):
        _emit(data, _output(args))
    else:
        from houndd.render import labels_text

        print(f"{args.node}: {labels_text(data.get('labels'))}")
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    if args.op == "generate":
        import base64

        print(base64.b64encode(os.urandom(32)).decode())
        return EXIT_OK
    if args.op != "list" and not args.key:
        raise UsageError(f"`houndd keys {args.op}` needs a base64 key")
    with _client(args) as c:
        if args.op == "list":
            data = c.get("/v1/keys")
        else:
            data = c.request("POST", "/v1/keys", json_body={"op": args.op, "key": args.key})
    if _output(args) in ("json", "yaml"):
        _emit(data, _output(args))
    else:
        from houndd.render import keys_lines

        _print(keys_lines(args.op, data, _term(sys.stdout), no_headers=args.no_headers))
    failed = [n for n, r in data.get("nodes", {}).items() if r.get("error")]
    return EXIT_FAILED if failed else EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    from houndd.completion import completion_script

    sys.stdout.write(completion_script(build_parser(), args.shell))
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    import argparse

    class Formatter(argparse.HelpFormatter):
        """argparse's formatter, sized without `shutil` (argparse builds one per argument)."""

        def __init__(self, prog: str) -> None:
            try:
                columns = os.get_terminal_size(sys.stdout.fileno()).columns
            except (OSError, ValueError):
                columns = 80
            super().__init__(prog, width=max(columns - 2, 40))

    class Parser(argparse.ArgumentParser):
        def __init__(self, **kw: Any) -> None:
            super().__init__(formatter_class=Formatter, **kw)

    p = Parser(
        prog="houndd",
        description="Warm container images across a fleet of Docker hosts.",
        epilog="Exit codes: 0 ok, 1 something failed, 2 usage or configuration error, "
        "3 daemon unreachable, 130 interrupted.",
    )
    p.add_argument("-V", "--version", action="version", version=f"houndd {__version__}")
    # `prog` given: argparse would otherwise build a help formatter (and import shutil) now
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        prog="houndd",
        parser_class=Parser,
    )

    def node_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--config",
            help="TOML config file (default: $HOUNDD_CONFIG or /etc/houndd/houndd.toml)",
        )
        sp.add_argument("--state-dir", dest="state_dir", help="keys and the store (config key)")

    def client_options(sp: argparse.ArgumentParser, *, table: bool = False) -> None:
        node_options(sp)
        sp.add_argument(
            "--api",
            help="any node's API: http://HOST:PORT (default: $HOUNDD_API, else the local node)",
        )
        sp.add_argument(
            "--token",
            help="API bearer token (default: $HOUNDD_TOKEN, else derived from the cluster key)",
        )
        sp.add_argument("--json", action="store_true", help="machine-readable output (-o json)")
        if table:
            sp.add_argument(
                "-o",
                "--output",
                choices=OUTPUTS,
                default="table",
                help="table (default), wide (more columns), json or yaml",
            )
            sp.add_argument("--no-headers", action="store_true", help="table rows only")

    sp = sub.add_parser("init", help="create the state directory, identity key and cluster key")
    node_options(sp)
    sp.add_argument("--join-key-file", help="join an existing cluster with this key file")
    sp.add_argument(
        "--force", action="store_true", help="replace a different cluster key already installed"
    )
    sp.set_defaults(func=cmd_init)

    sp = sub.add_parser("run", help="run the daemon")
    node_options(sp)
    sp.add_argument("--node-name", dest="node_name")
    sp.add_argument("--bind")
    sp.add_argument("--port", type=int)
    sp.add_argument("--advertise")
    sp.add_argument("--preset", choices=["lan", "local"])
    sp.add_argument("--docker-host", dest="docker_host")
    sp.add_argument("--seed", action="append", help="host:port of a peer (repeatable)")
    sp.add_argument("--no-mdns", action="store_true")
    sp.add_argument("--label", action="append", type=_label_arg, help="key=value (repeatable)")
    sp.add_argument("--log-format", dest="log_format", choices=["text", "json"])
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("status", help="members, roles, versions, labels, coordinator and term")
    client_options(sp, table=True)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("submit", help="submit a plan (YAML or JSON file, - for stdin)")
    client_options(sp, table=True)
    sp.add_argument("file")
    sp.add_argument(
        "--wait", action="store_true", help="follow progress; exit 0 only if all succeeded"
    )
    sp.add_argument("--quiet", action="store_true", help="with --wait: no progress, the report")
    sp.add_argument(
        "--dry-run",
        action="store_true",
        help="per node: images it lacks, bytes to transfer, whether its disk suffices; "
        "nothing stored, nothing pulled",
    )
    sp.set_defaults(func=cmd_submit)

    sp = sub.add_parser("validate", help="check a plan file offline and show its groups")
    sp.add_argument("file")
    sp.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    sp.set_defaults(func=cmd_validate)

    for action in ("remove", "prune"):
        sp = sub.add_parser(action, help=f"{action} images on nodes (a {action} plan)")
        client_options(sp, table=True)
        if action == "remove":
            sp.add_argument("images", nargs="+")
        else:
            sp.set_defaults(images=[])
        sp.add_argument("--nodes", nargs="+")
        sp.add_argument("--all", action="store_true")
        sp.add_argument("--quiet", action="store_true", help="no progress, the report")
        sp.set_defaults(func=_op_command(action))

    sp = sub.add_parser("plans", help="list plans")
    client_options(sp, table=True)
    sp.set_defaults(func=cmd_plans)

    sp = sub.add_parser("plan", help="show one plan: per node x image state")
    client_options(sp, table=True)
    sp.add_argument("id")
    sp.add_argument("--follow", "-f", action="store_true", help="follow it until it ends")
    sp.add_argument("--quiet", action="store_true", help="with --follow: no progress")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("cancel", help="cancel a plan: stop dispatching, abort in-flight pulls")
    client_options(sp)
    sp.add_argument("id")
    sp.set_defaults(func=cmd_cancel)

    sp = sub.add_parser("label", help="set (k=v) or remove (k-) labels of a node")
    client_options(sp)
    sp.add_argument("node")
    sp.add_argument("labels", nargs="+", metavar="k=v|k-")
    sp.set_defaults(func=cmd_label)

    sp = sub.add_parser("keys", help="cluster keyring: list | install | use | remove | generate")
    client_options(sp, table=True)
    sp.add_argument("op", choices=["list", "install", "use", "remove", "generate"])
    sp.add_argument("key", nargs="?")
    sp.set_defaults(func=cmd_keys)

    sp = sub.add_parser("completion", help="shell completion script: bash or zsh")
    sp.add_argument("shell", choices=["bash", "zsh"])
    sp.set_defaults(func=cmd_completion)
    return p


def _op_command(action: str) -> Callable[[argparse.Namespace], int]:
    return lambda args: _op_plan(args, action)


# --- main -------------------------------------------------------------------------------------


def _exit_code(e: HounddError, command: str) -> int:
    """Print the error in one line (or a few, for Ctrl-C) and return the documented code."""
    from houndd.client import ApiError, BadApiAddress, Unreachable

    if isinstance(e, UsageError):
        _warn(f"{command}: {e}")
        return EXIT_USAGE
    if isinstance(e, BadApiAddress | ConfigError | KeyFileError):
        _warn(str(e))
        return EXIT_USAGE
    if isinstance(e, Unreachable):
        _warn(str(e))
        return EXIT_UNREACHABLE
    if isinstance(e, Interrupted):
        print(file=sys.stderr)
        _warn(str(e))
        return EXIT_INTERRUPTED
    if isinstance(e, ApiError):
        text = e.title if not e.detail else f"{e.title}: {e.detail}"
        if e.field and e.field != "body":
            text += f" (field {e.field})"
        _warn(text)
        # the request was wrong (bad input, no or wrong token, unknown id): like bad usage
        return EXIT_USAGE if e.status in (400, 401, 403, 404, 405, 413, 422) else EXIT_FAILED
    _warn(str(e))
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code as documented above. No traceback for any error a user
    can cause (those are bugs: they still show one)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv in (["--version"], ["-V"]):
            # the one call that must not pay for building every subcommand's parser
            print(f"houndd {__version__}")
            return EXIT_OK
        args = build_parser().parse_args(argv)
        try:
            code: int = args.func(args)
            sys.stdout.flush()
            return code
        except HounddError as e:
            return _exit_code(e, args.command)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`houndd plans | head`): nothing left to say to it
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
