"""smartmixed-serve: serve a model repository over HTTP (flags override SMARTMIXED_* variables)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import ValidationError
from pydantic_core import PydanticUndefined

from smartmixed.serve.management import load_at_start
from smartmixed.serve.models import LoadError
from smartmixed.serve.settings import ServeSettings

GRACEFUL_SHUTDOWN_S = 30  # SIGTERM: stop accepting, let in-flight requests finish


def build_parser() -> argparse.ArgumentParser:
    """One flag per ServeSettings field (--max-batch-size for max_batch_size), its help the
    field's description: names and defaults are declared once, in settings.py."""
    p = argparse.ArgumentParser(
        prog="smartmixed-serve",
        description="Serve every model of a repository (NAME/VERSION/model.onnx) with the Open "
        "Inference Protocol (KServe V2) over ONNX Runtime. Each flag can also be set as an "
        "environment variable SMARTMIXED_<NAME> (e.g. SMARTMIXED_MAX_BATCH_SIZE).",
    )
    for name, field in ServeSettings.model_fields.items():
        flag, kind = "--" + name.replace("_", "-"), field.annotation
        help_text = field.description or ""
        if "default" not in help_text and field.default not in (None, PydanticUndefined):
            help_text += f" (default {field.default})"
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_text)
        elif get_origin(kind) is list:  # repeated: --load-model a --load-model b
            p.add_argument(flag, action="append", metavar=name.upper(), help=help_text)
        elif get_origin(kind) is Literal:
            p.add_argument(flag, choices=list(get_args(kind)), help=help_text)
        elif name == "api_key":
            p.add_argument(flag, help=help_text + "; prefer SMARTMIXED_API_KEY: flags show in ps")
        else:
            scalar = next((t for t in (int, float, Path) if t in (kind, *get_args(kind))), str)
            p.add_argument(flag, type=scalar, help=help_text)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = ServeSettings(**overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
            if err["loc"]
            else err["msg"].removeprefix("Value error, ")  # a check across fields
            for err in e.errors()
        )
        print(f"smartmixed-serve: error: {problems}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Load before binding a port: a bad repository is one line and exit 2, not a
    # traceback from inside the server's lifespan.
    try:
        repository = load_at_start(settings)  # what model_control_mode loads at start
    except LoadError as e:
        print(f"smartmixed-serve: error: {e}", file=sys.stderr)
        return 2
    from smartmixed.serve import server as http
    from smartmixed.serve.app import create_app
    from smartmixed.serve.grpc_server import check_grpc_port

    try:  # the gRPC server binds in the app's lifespan, where a failure is a traceback
        check_grpc_port(settings)
    except OSError as e:
        print(f"smartmixed-serve: error: {e}", file=sys.stderr)
        return 2

    nofile = http.raise_open_file_limit()
    limits = http.ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        send_timeout_s=settings.send_timeout_s,
        max_unsent_bytes=settings.max_unsent_bytes,
        max_connections=http.connection_cap(settings.max_connections),
    )
    if limits.max_connections < settings.max_connections:
        logging.getLogger("smartmixed.serve").info(
            "connection cap %d (max_connections %d, open-file limit %d)",
            limits.max_connections,
            settings.max_connections,
            nofile,
        )
    stats = http.ConnectionStats({})
    app = create_app(settings, repository=repository, connections=stats)
    started = http.run_server(
        app,
        host=settings.host,
        port=settings.port,
        limits=limits,
        stats=stats,
        keep_alive_timeout_s=settings.keep_alive_timeout_s,
        graceful_shutdown_s=GRACEFUL_SHUTDOWN_S,
        log_level=settings.log_level,
        metrics_port=settings.metrics_port,
        ready=lambda: app.state.service.ready,
    )
    if not started:
        # uvicorn logs a failed lifespan startup and returns; the reason is in the log above
        print(
            "smartmixed-serve: error: the server did not start (see the log above)", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
