"""`tiermoe serve`: load a model, start the OpenAI-compatible server, say where it listens."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from rich.console import Console

from ..errors import InvalidRequestError
from ..flags import add_engine_args, engine_kwargs
from .guard import DEFAULT_MAX_BODY_BYTES

# On Ctrl+C or SIGTERM, requests still running after this long end with an error event and [DONE]
# (a 503 when not streamed); uvicorn's own cancellation, which cuts streams short, comes later.
SHUTDOWN_GRACE_S = 5.0


class ReadyServer(uvicorn.Server):
    """A uvicorn Server that knows its URL once listening (port 0 picks a free port) and calls
    on_ready(url) then, so the ready line is printed only when clients can connect. On shutdown it gives
    running requests grace_s to finish, then ends them through the app's drain()."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_ready: Callable[[str], None] | None = None,
        grace_s: float = SHUTDOWN_GRACE_S,
    ):
        config.timeout_graceful_shutdown = grace_s + 5  # time for the drained streams to say goodbye
        super().__init__(config)
        self.on_ready = on_ready
        self.grace_s = grace_s

    async def shutdown(self, sockets=None) -> None:
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if drain is not None:
            asyncio.get_running_loop().call_later(self.grace_s, drain)
        await super().shutdown(sockets)

    @property
    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready(self.url)


@contextmanager
def serving(
    app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0, grace_s: float = SHUTDOWN_GRACE_S
) -> Iterator[str]:
    """Run `app` in a background thread (a notebook, a test) and yield its URL once it accepts
    connections; stop it on exit, giving running requests grace_s."""
    server = ReadyServer(uvicorn.Config(app, host=host, port=port, log_level="warning"), grace_s=grace_s)
    thread = threading.Thread(target=server.run, name="tiermoe-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield server.url
    finally:
        server.should_exit = True
        thread.join(timeout_s)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics.",
    )
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model ids clients may send, the first one shown (default: the directory name)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TIERMOE_API_KEY"),
        help="require this key (Authorization: Bearer KEY) on every /v1 route (default: $TIERMOE_API_KEY; "
        "none: open)",
    )
    parser.add_argument(
        "--max-request-mib",
        type=float,
        default=DEFAULT_MAX_BODY_BYTES / 2**20,
        help="largest request body accepted, MiB (default: %(default)g)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed of every request that sends none: the same request gives the same output "
        "(default: fresh randomness per request)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..api import LLM  # torch is heavy: import it only once a command needs a model
    from .app import create_app

    if not 0 <= args.port <= 65535:
        raise InvalidRequestError(f"--port must be 0 (any free port) to 65535, got {args.port}")
    if args.max_request_mib <= 0:
        raise InvalidRequestError(f"--max-request-mib must be > 0, got {args.max_request_mib:g}")
    if args.seed is not None and not -(2**63) <= args.seed < 2**64:
        raise InvalidRequestError(f"--seed must fit in 64 bits, got {args.seed}")

    console = Console(stderr=True)
    llm = LLM(args.model, **engine_kwargs(args))  # the loader draws the progress bars
    names = args.served_model_name or [llm.model_name]
    if args.api_key is None and not _is_loopback(args.host):
        console.print(
            f"[bold yellow]Warning:[/] listening on {args.host} without an API key: anyone who can reach this "
            "machine can use the model; set --api-key or TIERMOE_API_KEY",
            soft_wrap=True,
        )

    def ready(url: str) -> None:
        console.print(
            f"[bold green]Ready:[/] serving [bold]{names[0]}[/] at [bold]{url}/v1[/] (OpenAI-compatible; Ctrl+C stops)",
            soft_wrap=True,  # one line, so scripts can read the URL off it
        )

    config = uvicorn.Config(
        create_app(llm, names, args.api_key, int(args.max_request_mib * 2**20), args.seed),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
    )
    # uvicorn re-raises the Ctrl+C it handled once it has shut down cleanly: that is a normal stop.
    with contextlib.suppress(KeyboardInterrupt):
        ReadyServer(config, on_ready=ready).run()
    console.print("Server stopped.")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False
