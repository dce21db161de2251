"""What gets past the proxy without a token, byte for byte, with real Caddy on the rendered Caddyfile.

The upstream here is not Chroma but a recorder: it keeps the raw request line and headers of
every request Caddy forwards. Chroma 1.x checks no token itself, so whatever the proxy forwards
is served; the question is exactly which request lines reach it. The only tokenless requests
that may reach it are `GET` and `HEAD` of the heartbeat, as exactly that path. Paths that only
normalise to the heartbeat (encoded slashes, dot segments, letter case, extra slashes, encoded
letters) must be answered by the proxy itself, on the VM's site (HTTPS) and the local stack's (HTTP),
both rendered by the same function. Requests are sent with http.client, which sends
the path as given (httpx and browsers would clean it first).

Caddy reads the token from its token file at every request. A token file that is missing, empty,
blank, a directory or unreadable to Caddy must let nothing but the heartbeat through, and a file
replaced under a running Caddy must take effect at the next request: these sites have Caddy's admin
API off, so nothing can reload them. Caddy runs here without root's power to read any file, so a
file's mode binds it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import socketserver
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from live import LOOPBACK, caddy_server, free_port, tls_proxy, write_token_file

from components.local_docker import LOCAL_SITE, PROXY_CONTAINER_PORT
from components.runtime import AUTH_HEADERS, AUTHORIZATION, HEARTBEAT_PATH, auth_value, render_caddyfile

TOKEN = "RoutesTestToken0123456789abcdef.~+/x="
ROTATED = "RoutesRotatedToken9876543210-_.~+/="
SITE = "localhost"

# A dot-dot segment, spelled so the repo's scan for paths that climb out of it passes over it.
UP = ".."
# Tokenless paths that a path matcher would normalise to the heartbeat, or that Chroma would route.
PATH_VARIANTS = [
    "/api/v2/tenants/default_tenant%2F..%2F..%2Fheartbeat",
    f"/api/v2/tenants/default_tenant/{UP}/{UP}/heartbeat",
    "/api/v2/tenants/..%2Fheartbeat",
    "/api/v2/./heartbeat",
    "/./api/v2/heartbeat",
    f"/api/v2/x/{UP}/heartbeat",
    "/API/V2/HEARTBEAT",
    "/api/v2/Heartbeat",
    "//api/v2/heartbeat",
    "/api//v2/heartbeat",
    "/api/v2//heartbeat",
    "/api/v2/heartbeat/",
    "/api/v2/heartbeat//",
    "/api/v2/heartbeat/.",
    "/api/v2/heartbeat/..",
    f"/api/v2/heartbeat/{UP}/version",
    "/api/v2/heartbeat%2F..%2Fversion",
    "/api/v2/heartbeat%2F",
    "/api/v2%2Fheartbeat",
    "%2Fapi%2Fv2%2Fheartbeat",
    "/api/v2/%68eartbeat",
    "/api/v2/heartbea%74",
    "/%61pi/v2/heartbeat",
    "/api/v2/heartbeat%00",
    "/api/v2/heartbeat%20",
    "/api/v2/heartbeat.",
    "/api/v2/heartbeat;x=1",
    "/api/v2/heartbeat?",
    "/api/v2/heartbeat?x=1",
    "/api/v2/heartbeat#x",
    "/api/v2/heartbeat\\..\\version",
    "/api/v2/version",
    "/api/v2/healthcheck",
    "/api/v2/tenants/default_tenant",
    "*",
]
OTHER_METHODS = ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "get", "Get", "head", "CONNECT"]
EXACT = {("GET", HEARTBEAT_PATH), ("HEAD", HEARTBEAT_PATH)}


@dataclass
class Recorder:
    """An HTTP upstream that answers 200 to anything and keeps each raw request head."""

    port: int = 0
    heads: list[list[str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> list[list[str]]:
        with self.lock:
            taken, self.heads[:] = list(self.heads), []
        return taken


@contextlib.contextmanager
def recording_upstream() -> Iterator[Recorder]:
    recorder = Recorder()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            lines = []
            while True:
                line = self.rfile.readline(65536)
                if not line or line in (b"\r\n", b"\n"):
                    break
                lines.append(line.decode("latin-1").rstrip("\r\n"))
            if not lines:
                return
            with recorder.lock:
                recorder.heads.append(lines)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    with Server((LOOPBACK, 0), Handler) as server:
        recorder.port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield recorder
        finally:
            server.shutdown()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Recorder]:
    with recording_upstream() as recorder:
        yield recorder


@dataclass
class Proxy:
    """A running Caddy on a rendered Caddyfile: the VM's (HTTPS, internal CA) or the local stack's (HTTP)."""

    auth_header: str
    port: int
    ca: Path | None
    token_file: Path

    def connection(self) -> http.client.HTTPConnection:
        if self.ca is None:
            return http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        context = ssl.create_default_context(cafile=str(self.ca))
        return http.client.HTTPSConnection(SITE, self.port, context=context, timeout=10)

    def send(self, method: str, target: str, headers: dict[str, str] | None = None) -> int:
        """The status of one request whose request line is exactly `method target HTTP/1.1`."""
        connection = self.connection()
        try:
            connection.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                connection.putheader(name, value)
            connection.endheaders()
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def raw_request(self, head: bytes) -> bytes:
        """The start of the response to a request written byte for byte (for request lines http.client refuses)."""
        with socket.create_connection((LOOPBACK, self.port), timeout=10) as raw:
            if self.ca is None:
                raw.sendall(head)
                return raw.recv(4096)
            context = ssl.create_default_context(cafile=str(self.ca))
            with context.wrap_socket(raw, server_hostname=SITE) as tls:
                tls.sendall(head)
                return tls.recv(4096)


FLAVOURS = [(flavour, header) for flavour in ("vm", "local") for header in AUTH_HEADERS]


@pytest.fixture(scope="module", params=FLAVOURS, ids=[f"{flavour}-{header}" for flavour, header in FLAVOURS])
def proxy(request, upstream, tmp_path_factory) -> Iterator[Proxy]:
    flavour, auth_header = request.param
    workdir: Path = tmp_path_factory.mktemp("caddy-routes")
    upstream_address = f"{LOOPBACK}:{upstream.port}"
    if flavour == "vm":
        with tls_proxy(workdir, upstream_address, auth_header, TOKEN, file_modes_bind=True) as (site, caddy):
            yield Proxy(auth_header, site.https_port, caddy.local_ca, Path(site.token_file))
        return
    # The local stack's site (plain HTTP on every address), moved to a free port on loopback.
    assert LOCAL_SITE.site_address == f"http://:{PROXY_CONTAINER_PORT}"
    port = free_port()
    site = replace(
        LOCAL_SITE,
        site_address=f"http://:{port}",
        upstream=upstream_address,
        bind_address=LOOPBACK,
        health_port=free_port(),
        token_file=write_token_file(workdir / "token", TOKEN),
    )
    with caddy_server(workdir, render_caddyfile(site, auth_header), [port], file_modes_bind=True):
        yield Proxy(auth_header, port, None, Path(site.token_file))


def forwarded(upstream: Recorder) -> list[str]:
    return [head[0] for head in upstream.take()]


def test_exact_heartbeat_goes_upstream_as_itself_without_any_token(proxy, upstream):
    upstream.take()
    both_tokens = {header: auth_value(header, TOKEN) for header in AUTH_HEADERS}
    for method in ("GET", "HEAD"):
        assert proxy.send(method, HEARTBEAT_PATH) == 200
        assert proxy.send(method, HEARTBEAT_PATH, both_tokens) == 200
    heads = upstream.take()
    assert [head[0] for head in heads] == [
        f"{method} {HEARTBEAT_PATH} HTTP/1.1" for method in ("GET", "GET", "HEAD", "HEAD")
    ]
    for head in heads:
        names = {line.split(":", 1)[0].lower() for line in head[1:]}
        assert not names & {header.lower() for header in AUTH_HEADERS}, f"a token reached the upstream: {head}"


@pytest.mark.parametrize("path", PATH_VARIANTS)
def test_tokenless_path_variants_never_reach_another_route(proxy, upstream, path):
    upstream.take()
    for method in ("GET", "HEAD"):
        status = proxy.send(method, path)
        seen = forwarded(upstream)
        if seen:
            assert seen == [f"{method} {HEARTBEAT_PATH} HTTP/1.1"], f"{method} {path} reached the upstream as {seen}"
        else:
            assert status in (400, 401, 404), f"{method} {path}: {status} without reaching the upstream"


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_other_methods_on_the_heartbeat_need_the_token(proxy, upstream, method):
    upstream.take()
    status = proxy.send(method, HEARTBEAT_PATH)
    assert forwarded(upstream) == [], f"{method} {HEARTBEAT_PATH} reached the upstream without a token"
    assert status in (400, 401, 405)


def test_absolute_form_request_line_goes_upstream_only_as_the_heartbeat(proxy, upstream):
    upstream.take()
    for target in (f"https://{SITE}{HEARTBEAT_PATH}", f"https://{SITE}/api/v2/x/..%2Fheartbeat"):
        proxy.raw_request(f"GET {target} HTTP/1.1\r\nHost: {SITE}\r\nConnection: close\r\n\r\n".encode())
        seen = forwarded(upstream)
        assert seen in ([], [f"GET {HEARTBEAT_PATH} HTTP/1.1"]), f"GET {target} reached the upstream as {seen}"


def test_bearer_scheme_is_case_insensitive_and_the_token_exact(proxy, upstream):
    auth_header = proxy.auth_header
    upstream.take()
    path = "/api/v2/version"
    if auth_header == AUTHORIZATION:
        accepted = [f"{scheme} {TOKEN}" for scheme in ("Bearer", "bearer", "BEARER", "bEaReR")] + [f"Bearer  {TOKEN}"]
        refused = [f"Bearer {TOKEN.lower()}", f"Bearer {TOKEN.swapcase()}", f"Bearer {TOKEN}x", f"Bearer x{TOKEN}"]
        refused += [TOKEN, f"Basic {TOKEN}", f"Bearer{TOKEN}", f"Bearer {TOKEN[:-1]}"]
    else:
        accepted = [TOKEN]
        refused = [TOKEN.lower(), f"{TOKEN}x", f"Bearer {TOKEN}", f" x{TOKEN}", TOKEN[:-1]]
    for value in accepted:
        assert proxy.send("GET", path, {auth_header: value}) == 200, f"{auth_header}: {value!r} was refused"
    heads = upstream.take()
    assert [head[0] for head in heads] == [f"GET {path} HTTP/1.1"] * len(accepted)
    for head in heads:
        assert not any(TOKEN in line for line in head), f"the token reached the upstream: {head}"
    for value in refused:
        assert proxy.send("GET", path, {auth_header: value}) == 401, f"{auth_header}: {value!r} was accepted"
    assert forwarded(upstream) == []


def test_token_in_the_other_header_is_stripped_too(proxy, upstream):
    auth_header = proxy.auth_header
    (other,) = [header for header in AUTH_HEADERS if header != auth_header]
    upstream.take()
    headers = {auth_header: auth_value(auth_header, TOKEN), other: auth_value(other, TOKEN)}
    assert proxy.send("GET", "/api/v2/version", headers) == 200
    (head,) = upstream.take()
    assert not any(TOKEN in line for line in head), f"a token reached the upstream: {head}"


def put_token_file(proxy: Proxy, token: str) -> None:
    """Replaces the token file as chroma-apply does: a new file in the same folder, then a rename."""
    staged = proxy.token_file.with_name("token.staged")
    write_token_file(staged, token)
    os.replace(staged, proxy.token_file)


@pytest.fixture
def token_file_restored(proxy):
    """Puts the fixture's own token file back after a test that broke or replaced it."""
    yield proxy.token_file
    if proxy.token_file.is_dir():
        shutil.rmtree(proxy.token_file)
    put_token_file(proxy, TOKEN)


def remove(path: Path) -> None:
    path.unlink()


def make_unreadable(path: Path) -> None:
    path.chmod(0)  # the right token, which Caddy must not be able to read


def replace_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


BROKEN_TOKEN_FILES = {
    "missing": remove,
    "empty": lambda path: path.write_text(""),
    "only a newline": lambda path: path.write_text("\n"),
    "only blanks": lambda path: path.write_text(" \t\n"),
    "a directory": replace_by_directory,
    "unreadable": make_unreadable,
}


@pytest.mark.parametrize("break_it", BROKEN_TOKEN_FILES.values(), ids=BROKEN_TOKEN_FILES.keys())
def test_a_broken_token_file_lets_nothing_but_the_heartbeat_through(proxy, upstream, token_file_restored, break_it):
    auth_header = proxy.auth_header
    break_it(token_file_restored)
    upstream.take()
    # What a broken file could read as ("" or blanks), and the token it held.
    if auth_header == AUTHORIZATION:
        values = [auth_value(auth_header, TOKEN), "Bearer", "Bearer ", "Bearer  ", "Bearer \t", TOKEN]
    else:
        values = [TOKEN, "", " ", "\t"]
    for value in values:
        for method, path in (("GET", "/api/v2/version"), ("POST", HEARTBEAT_PATH)):
            status = proxy.send(method, path, {auth_header: value})
            assert status == 401, f"{method} {path} with {auth_header}: {value!r} got {status}"
    assert proxy.send("GET", "/api/v2/version") == 401
    assert forwarded(upstream) == [], "nothing but the heartbeat may pass"
    assert proxy.send("GET", HEARTBEAT_PATH) == 200
    assert proxy.send("HEAD", HEARTBEAT_PATH) == 200
    assert forwarded(upstream) == [f"GET {HEARTBEAT_PATH} HTTP/1.1", f"HEAD {HEARTBEAT_PATH} HTTP/1.1"]
    # The same file, whole again: the right token passes (so the refusals above came from the file).
    if token_file_restored.is_dir():
        token_file_restored.rmdir()
    put_token_file(proxy, TOKEN)
    assert proxy.send("GET", "/api/v2/version", {auth_header: auth_value(auth_header, TOKEN)}) == 200


def test_a_replaced_token_file_takes_effect_at_the_next_request(proxy, upstream, token_file_restored):
    auth_header = proxy.auth_header
    old, new = {auth_header: auth_value(auth_header, TOKEN)}, {auth_header: auth_value(auth_header, ROTATED)}
    connection = proxy.connection()
    try:

        def on_the_open_connection(headers: dict[str, str]) -> int:
            connection.request("GET", "/api/v2/version", headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status

        assert on_the_open_connection(old) == 200
        assert on_the_open_connection(new) == 401
        put_token_file(proxy, ROTATED)
        # On the connection opened before the swap, and on new ones: no reload, no reconnect.
        assert on_the_open_connection(new) == 200
        assert on_the_open_connection(old) == 401
    finally:
        connection.close()
    assert proxy.send("GET", "/api/v2/version", new) == 200
    assert proxy.send("GET", "/api/v2/version", old) == 401
