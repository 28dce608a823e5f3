"""The ``vodq`` command.

``serve`` runs the API and the scheduler in one process; ``migrate`` works on
the database directly. ``add``, ``priority``, ``upload`` and ``status`` talk to
the running service over HTTP, so they work from any machine that reaches it and never
bypass its wake-ups or its auth.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

import httpx

from vodq.config import Settings, read_environment, settings_from, variable_name
from vodq.errors import ConfigError

EXIT_USAGE = 2
EXIT_FAILED = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    environment = read_environment()
    try:
        settings = settings_from(environment)
    except ConfigError as exc:
        print(f"vodq: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args.environment = environment
    handler = args.handler
    return int(handler(args, settings))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vodq",
        description=(
            "Archive video-on-demand recordings from a prioritized queue. "
            "Configuration comes from the environment and ./.env."
        ),
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the HTTP API and the download scheduler in one process"
    )
    serve.add_argument("--host", help="listen address (overrides HTTP_ADDR)")
    serve.add_argument("--port", type=int, help="listen port (overrides HTTP_ADDR)")
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply database migrations at start-up",
    )
    serve.set_defaults(handler=_serve, run_api=True, run_worker=True)

    api = commands.add_parser(
        "api", help="run only the HTTP API (scale downloads with 'vodq worker')"
    )
    api.add_argument("--host", help="listen address (overrides HTTP_ADDR)")
    api.add_argument("--port", type=int, help="listen port (overrides HTTP_ADDR)")
    api.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply database migrations at start-up",
    )
    api.set_defaults(handler=_serve, run_api=True, run_worker=False)

    worker = commands.add_parser(
        "worker",
        help="run only the download and upload stages, sharing DB_DSN with others",
    )
    worker.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply database migrations at start-up",
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve this worker's Prometheus metrics on PORT (path /metrics)",
    )
    worker.set_defaults(handler=_serve, run_api=False, run_worker=True)

    migrate = commands.add_parser(
        "migrate", help="apply database migrations to DB_DSN (works on the database)"
    )
    migrate.set_defaults(handler=_migrate)

    copy_db = commands.add_parser(
        "copy-db",
        help=(
            "copy the queue into another database, such as SQLite into "
            "PostgreSQL (works on the databases; stop vodq first)"
        ),
    )
    copy_db.add_argument(
        "--to",
        dest="target_dsn",
        required=True,
        metavar="DSN",
        help="database to copy into: postgres://USER:PASSWORD@HOST:5432/DB "
        "or sqlite:///PATH",
    )
    copy_db.add_argument(
        "--from",
        dest="source_dsn",
        metavar="DSN",
        help="database to copy from (default: DB_DSN)",
    )
    copy_db.add_argument(
        "--merge",
        action="store_true",
        help="copy into a database that already has VODs, skipping each "
        "vod_id it already contains",
    )
    copy_db.set_defaults(handler=_copy_db)

    server_help = (
        "base URL of the running service (default: $VODQ_SERVER, else "
        "http://127.0.0.1:PORT from HTTP_ADDR)"
    )
    add = commands.add_parser(
        "add", help="queue a VOD by id or URL (talks to the running service)"
    )
    add.add_argument("target", metavar="URL_OR_ID", help="a VOD id or an http(s) URL")
    add.add_argument(
        "--priority", type=int, default=0, help="higher runs first (default 0)"
    )
    add.add_argument("--title", help="title to store with the VOD")
    add.add_argument("--date", help="ISO 8601 date of the VOD, e.g. 2024-10-15")
    add.add_argument("--channel", help="channel name to store with the VOD")
    add.add_argument("--server", help=server_help)
    add.set_defaults(handler=_add)

    priority = commands.add_parser(
        "priority", help="set a VOD's priority (talks to the running service)"
    )
    priority.add_argument("vod_id", metavar="VOD_ID")
    priority.add_argument("priority", type=int, metavar="PRIORITY")
    priority.add_argument("--server", help=server_help)
    priority.set_defaults(handler=_priority)

    config = commands.add_parser(
        "config",
        help="show or change runtime settings for every worker (talks to the service)",
        description=(
            "Without arguments, print each runtime setting with its value and "
            "source. NAME=VALUE changes one (same grammar as the environment "
            "variable, e.g. DOWNLOAD_RATE_LIMIT=2M); NAME= returns it to its "
            "start-up value."
        ),
    )
    config.add_argument("changes", nargs="*", metavar="NAME=VALUE")
    config.add_argument(
        "--stop-excess",
        action="store_true",
        help="when lowering MAX_CONCURRENT_DOWNLOADS, also stop the downloads "
        "above the new limit (they resume later)",
    )
    config.add_argument("--server", help=server_help)
    config.set_defaults(handler=_config)

    upload = commands.add_parser(
        "upload",
        help="upload done VODs that were never uploaded (talks to the service)",
        description=(
            "Send VODs that were downloaded while uploads were off (UPLOADER=none "
            "or skip_upload) to the upload stage. Each one needs its file in "
            "DATA_DIR/vods."
        ),
    )
    upload.add_argument("vod_ids", nargs="*", metavar="VOD_ID")
    upload.add_argument(
        "--all-not-uploaded",
        action="store_true",
        help="every done VOD without a remote id whose file still exists",
    )
    upload.add_argument("--server", help=server_help)
    upload.set_defaults(handler=_upload)

    status = commands.add_parser(
        "status", help="print the queue status (talks to the running service)"
    )
    status.add_argument("--server", help=server_help)
    status.set_defaults(handler=_status)
    return parser


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from vodq.api.app import create_app
    from vodq.logs import configure_logging
    from vodq.service import Service

    configure_logging(settings.log_level, settings.log_format)
    try:
        service = Service(
            settings, run_worker=args.run_worker, environment=args.environment
        )
    except ConfigError as exc:
        # The uploader checks its own files (YOUTUBE_CREDENTIALS_FILE) here.
        print(f"vodq: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.run_api:
        return _run_worker_only(
            service, migrate=not args.no_migrate, metrics_port=args.metrics_port
        )

    host = args.host or settings.http_host
    port = args.port or settings.http_port
    # Bound before the scheduler starts, because a second vodq serve on a port
    # in use would otherwise claim VODs for a moment and stop them again.
    try:
        listener = _listen(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            other = port + 1 if port < 65535 else port - 1
            advice = (
                "Stop the process that uses it (perhaps another vodq serve), or "
                "choose a free port with HTTP_ADDR or --port, for example "
                f"--port {other}"
            )
        else:
            advice = (
                "Choose an address of this machine with HTTP_ADDR or --host, for "
                "example --host 127.0.0.1 (this machine only) or --host 0.0.0.0 "
                "(every interface)"
            )
        print(
            f"vodq: cannot listen on {host}:{port}: {exc.strerror or exc}. {advice}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.no_migrate:
        app = create_app(service, manage_lifecycle=False)
        service.start(migrate=False)
    else:
        app = create_app(service)
    _ignore_reraised_signals()
    # proxy_headers=False: uvicorn would otherwise replace the client address
    # with X-Forwarded-For from 127.0.0.1, and TRUSTED_PROXIES alone decides
    # whom vodq believes.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )
    _server_class()(config).run(sockets=[listener])
    if args.no_migrate:
        service.stop()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """Return a socket bound to ``host``:``port``, as uvicorn would bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    return listener


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, where a second SIGTERM or SIGINT exits at once."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:
                # Downloads keep their partial files; leases expire and other
                # workers (or the next start) resume them.
                os._exit(128 + sig)
            super().handle_exit(sig, frame)

    return Server


def _ignore_reraised_signals() -> None:
    """Make a clean SIGTERM or SIGINT shutdown exit 0.

    uvicorn (0.29 and later) restores the previous handlers after its
    graceful shutdown and raises the signal again; with the default handler
    that kills the process with status 143 after a clean stop. A second
    signal during the shutdown exits at once (see ``_server_class``).
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: None)


def _run_worker_only(
    service: Any, *, migrate: bool, metrics_port: int | None = None
) -> int:
    """Run the scheduler until SIGTERM or SIGINT; a second signal exits at once."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start(migrate=migrate)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=service.metrics.registry)
    stop.wait()
    service.stop()
    return 0


def _migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from vodq.db.engine import make_engine
    from vodq.db.migrate import upgrade

    engine = make_engine(settings.db_dsn)
    upgrade(engine)
    engine.dispose()
    print(f"database at {_redacted(settings.db_dsn)} is up to date")
    return 0


def _copy_db(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from vodq.errors import VodqError
    from vodq.logs import configure_logging
    from vodq.transfer import copy_queue

    configure_logging(settings.log_level, settings.log_format)
    try:
        report = copy_queue(
            args.source_dsn or settings.db_dsn, args.target_dsn, merge=args.merge
        )
    except VodqError as exc:
        print(f"vodq: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(asdict(report), indent=2))
    return 0


def _add(args: argparse.Namespace, settings: Settings) -> int:
    target: str = args.target
    body: dict[str, Any] = {"priority": args.priority}
    if target.startswith(("http://", "https://")):
        body["url"] = target
    else:
        body["vod_id"] = target
    for name in ("title", "date", "channel"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    return _call(settings, args.server, "POST", "/admin/vods", body)


def _priority(args: argparse.Namespace, settings: Settings) -> int:
    body = {"vod_id": args.vod_id, "priority": args.priority}
    return _call(settings, args.server, "POST", "/admin/vod/priority", body)


def _config(args: argparse.Namespace, settings: Settings) -> int:
    if not args.changes:
        return _call(settings, args.server, "GET", "/admin/config", None)
    body: dict[str, str | None] = {}
    for change in args.changes:
        name, sep, value = change.partition("=")
        if not sep or not name:
            print(
                f"vodq: {change!r} is not NAME=VALUE; use for example "
                "DOWNLOAD_RATE_LIMIT=2M",
                file=sys.stderr,
            )
            return EXIT_USAGE
        variable = variable_name(name)
        if variable in body:
            print(
                f"vodq: {variable} is given twice; give each variable once",
                file=sys.stderr,
            )
            return EXIT_USAGE
        body[variable] = value if value.strip() else None
    path = "/admin/config?stop_excess=true" if args.stop_excess else "/admin/config"
    return _call(settings, args.server, "PATCH", path, body)


def _upload(args: argparse.Namespace, settings: Settings) -> int:
    if bool(args.vod_ids) == bool(args.all_not_uploaded):
        print(
            "vodq: name VOD ids or pass --all-not-uploaded, not both; for "
            "example: vodq upload 123456789",
            file=sys.stderr,
        )
        return EXIT_USAGE
    body: dict[str, Any] = (
        {"all_not_uploaded": True}
        if args.all_not_uploaded
        else {"vod_ids": list(args.vod_ids)}
    )
    return _call(settings, args.server, "POST", "/admin/uploads", body)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    return _call(settings, args.server, "GET", "/status", None)


def _call(
    settings: Settings,
    server: str | None,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> int:
    base = (
        server
        or os.environ.get("VODQ_SERVER")
        or f"http://127.0.0.1:{settings.http_port}"
    )
    headers: dict[str, str] = {}
    auth: tuple[str, str] | None = None
    if settings.admin_token:
        headers["X-Admin-Token"] = settings.admin_token
    elif settings.admin_username and settings.admin_password:
        auth = (settings.admin_username, settings.admin_password)
    try:
        response = httpx.request(
            method,
            base.rstrip("/") + path,
            json=body,
            headers=headers,
            auth=auth,
            timeout=10,
        )
    except httpx.HTTPError as exc:
        print(
            f"vodq: cannot reach the service at {base}: {exc}; start it with "
            "'vodq serve' or pass --server",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": response.text}
    if response.is_error:
        message = (
            payload.get("error", payload) if isinstance(payload, dict) else payload
        )
        print(f"vodq: {response.status_code}: {message}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(payload, indent=2))
    return 0


def _redacted(dsn: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(dsn).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
