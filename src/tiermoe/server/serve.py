"""`tiermoe serve`: load a model, start the OpenAI-compatible server, say where it listens."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import uvicorn
from rich.console import Console

from ..launch import add_engine_args, load_llm
from .app import create_app


class ReadyServer(uvicorn.Server):
    """A uvicorn Server that knows its URL once listening (port 0 picks a free port) and calls
    on_ready(url) then, so the ready line is printed only when clients can connect."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[str], None] | None = None):
        super().__init__(config)
        self.on_ready = on_ready

    @property
    def url(self) -> str:
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready(self.url)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument(
        "--served-model-name", default=None, help="model id clients send (default: the directory name)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    add_engine_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    llm = load_llm(args.model, args, console)
    app = create_app(llm, args.served_model_name)
    name = args.served_model_name or llm.model_name

    def ready(url: str) -> None:
        console.print(
            f"[bold green]Ready:[/] serving [bold]{name}[/] at [bold]{url}/v1[/] (OpenAI-compatible; Ctrl+C stops)"
        )

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    ReadyServer(config, on_ready=ready).run()
    return 0
