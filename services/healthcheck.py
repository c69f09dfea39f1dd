"""Container health probes (`HEALTHCHECK` in the Dockerfiles, `healthcheck:` in docker-compose.yml).

    python -m services.healthcheck http     the front-end's GET /healthz answers 200 (Redis reachable and a
                                            worker alive); port from $TEACHER_HTTP_PORT (default 8000)
    python -m services.healthcheck worker   a worker on this host heartbeated in Redis within worker_ttl_s;
                                            model, Redis URL and namespace from the TEACHER_* variables
    python -m services.healthcheck grpc     the teacher at $PREFIX_DISTILL_TEACHER (grpc://host:port) reports
                                            SERVING on the standard gRPC health service (the trainer's probe)

Exit 0 when healthy, 1 otherwise with one line saying why. Only light imports: a probe runs every few seconds.
"""

from __future__ import annotations

import os
import socket
import sys


def check_http(url: str | None = None, timeout_s: float = 3.0) -> str:
    import urllib.error
    import urllib.request

    url = url or f"http://127.0.0.1:{os.environ.get('TEACHER_HTTP_PORT', '8000')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return f"{url}: {resp.status}"
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{url}: {err.code} {err.read(300).decode(errors='replace')}") from None
    except OSError as err:
        raise RuntimeError(f"{url}: {err}") from None


def check_worker() -> str:
    import redis

    from services.teacher.queue import QueueConfig, WorkerQueue
    from services.teacher.settings import TeacherSettings

    settings = TeacherSettings()  # TEACHER_* variables, as the worker itself read them
    queue = WorkerQueue(settings.redis_url, QueueConfig.from_settings(settings))
    try:
        alive = queue.live_workers()
    except redis.RedisError as err:
        raise RuntimeError(f"redis {settings.redacted_redis_url()}: {err}") from None
    finally:
        queue.close()
    host = socket.gethostname() + ":"
    mine = [w for w in alive if w.startswith(host)]
    if not mine:
        raise RuntimeError(f"no heartbeat from a worker on {host[:-1]} within {settings.worker_ttl_s} s")
    return f"alive: {', '.join(mine)}"


def check_grpc(target: str | None = None, timeout_s: float = 3.0) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = target or os.environ.get("PREFIX_DISTILL_TEACHER", "grpc://127.0.0.1:50051")
    address = target.removeprefix("grpc://")
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as err:
            raise RuntimeError(f"{target}: {err.code().name} {err.details()}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"{target}: {status}")
    return f"{target}: {status}"


CHECKS = {"http": check_http, "worker": check_worker, "grpc": check_grpc}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    kind = argv[0] if argv else "http"
    if kind not in CHECKS:
        print(
            f"usage: python -m services.healthcheck [{' | '.join(CHECKS)}] [URL or TARGET]", file=sys.stderr
        )
        return 2
    try:
        message = CHECKS[kind](*argv[1:2]) if kind != "worker" else check_worker()
    except Exception as err:  # any failure is "unhealthy", said in one line
        print(f"unhealthy: {err}", file=sys.stderr)
        return 1
    print(f"healthy: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
