"""Process orchestration: the front-end process (gRPC + HTTP on one event loop) and `serve` (front-end plus
supervised worker processes).

Shutdown on SIGTERM/SIGINT: health goes NOT_SERVING, the transports stop taking new calls and let in-flight
ones finish (grace period), then workers get SIGTERM and finish the batch in hand. A worker process that dies
is restarted by `serve`; its claimed batch is re-claimed from Redis after the visibility timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
from collections.abc import Callable, Sequence

from services.teacher.settings import TeacherSettings

log = logging.getLogger("prefix_distill.server")
GRACE_S = 5.0

HttpRoutes = Callable[[str, str], Sequence]
"""A composition root's hook: given this front-end's own gRPC target and the certificate file to trust for it
("" without TLS: a TLS front-end's own certificate, which gRPC accepts as the trust anchor of its loopback
connection), the extra FastAPI routers its HTTP app serves (built once, off the event loop; they reach the
teacher through that target like any client)."""


def local_target(host: str, port: int) -> str:
    """The gRPC target a client in this process dials for a server bound to `host`:`port`."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"grpc://{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted sockets only when their proto says TCP (with 0,
    # a keep-alive response's body waited for the ACK of its header: a ~40 ms delayed-ACK floor per request)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class WorkerPool:
    """N worker processes (spawned, so each owns its torch runtime), restarted when they die."""

    def __init__(self, settings: TeacherSettings) -> None:
        self.settings = settings
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.Process] = []

    def _spawn(self) -> mp.Process:
        from services.teacher.worker import run_worker

        p = self.ctx.Process(
            target=run_worker, args=(self.settings, os.getpid()), daemon=False, name="teacher-worker"
        )
        p.start()
        return p

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.settings.workers)]

    def supervise(self) -> None:
        for i, p in enumerate(self.procs):
            if not p.is_alive():
                log.warning("worker pid %s exited with %s; restarting", p.pid, p.exitcode)
                self.procs[i] = self._spawn()

    def stop(self, timeout_s: float = 30.0) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker finishes its batch and leaves
        for p in self.procs:
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join()


async def run_frontend(
    settings: TeacherSettings, pool: WorkerPool | None = None, http_routes: HttpRoutes | None = None
) -> None:
    """Runs gRPC and HTTP front-ends until SIGTERM/SIGINT (and supervises `pool` if given); `http_routes`
    adds routers to the HTTP app."""
    import uvicorn

    from services.teacher.frontend import Dispatcher
    from services.teacher.grpc_server import build_grpc_server
    from services.teacher.http_api import create_app
    from services.teacher.http_guard import KeepAliveOn500, guarded_h11
    from services.teacher.modelinfo import describe

    info, tokenizer = await asyncio.to_thread(describe, settings.engine_spec())
    dispatcher = Dispatcher(settings, info, tokenizer)
    await dispatcher.start()
    grpc_server, grpc_port = await build_grpc_server(dispatcher, settings.grpc_host, settings.grpc_port)
    http_sock = _bind(settings.http_host, settings.http_port)
    http_port = http_sock.getsockname()[1]
    routers = []
    if http_routes is not None:
        target = local_target(settings.grpc_host, grpc_port)
        routers = await asyncio.to_thread(http_routes, target, settings.tls_cert_file)
    app = create_app(dispatcher, routers)
    tls = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
    app.state.body_screen.start()
    config = uvicorn.Config(
        KeepAliveOn500(app),
        http=guarded_h11(settings.http_header_timeout_s, settings.http_max_connections_per_client),
        log_level="warning",
        lifespan="off",
        access_log=False,
        **(tls if settings.tls_cert_file else {}),
    )
    http_server = uvicorn.Server(config)
    http_server.install_signal_handlers = lambda: None  # we own the signals
    http_task = asyncio.create_task(http_server.serve(sockets=[http_sock]))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"teacher front-end ready: grpc={settings.grpc_host}:{grpc_port} http={settings.http_host}:{http_port} "
        f"model={info.model_id} redis={settings.redacted_redis_url()} namespace={settings.key_namespace()} "
        f"tls={'on' if settings.tls_cert_file else 'off'} auth={'on' if dispatcher.tokens.enabled else 'off'}",
        flush=True,
    )
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if pool is not None and not stop.is_set():
                pool.supervise()
    finally:
        log.info("shutting down")
        for listener in dispatcher.health_listeners:
            with contextlib.suppress(Exception):
                await listener(False)
        await grpc_server.stop(GRACE_S)
        http_server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http_task, GRACE_S)
        await dispatcher.stop()
        app.state.body_screen.close()
        if pool is not None:
            await asyncio.to_thread(pool.stop)
        print("teacher front-end stopped", flush=True)


def serve(settings: TeacherSettings, http_routes: HttpRoutes | None = None) -> None:
    """`prefix-distill teacher serve`: front-end plus `settings.workers` supervised worker processes."""
    pool = WorkerPool(settings)
    pool.start()
    try:
        asyncio.run(run_frontend(settings, pool, http_routes))
    finally:
        pool.stop()


def frontend(settings: TeacherSettings, http_routes: HttpRoutes | None = None) -> None:
    """`prefix-distill teacher frontend`: transports only (tokenizer and config, no weights)."""
    asyncio.run(run_frontend(settings, http_routes=http_routes))


def worker(settings: TeacherSettings) -> None:
    """`prefix-distill teacher worker`: one worker in this process."""
    from services.teacher.worker import run_worker

    run_worker(settings)
