"""Chroma behind the rendered Caddy proxy, run for real on loopback.

A real `chroma run` from the chromadb wheel (at Pulumi.yaml's chromaVersion, with the environment
of the VM's compose file) sits behind a real `caddy run` of the VM's Caddyfile. Loopback differs
from the VM only through ProxySite's parameters: site address, upstream, internal TLS, ports, token file.
For both token headers this shows: the heartbeat is open, everything else needs the configured
token in the configured header, a chromadb client does a full round trip over HTTPS verified
against Caddy's CA, plain HTTP redirects, and the token never reaches Chroma. Caddy also accepts
the VM's exact Caddyfile, and the compose file's health checks pass unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import certifi
import chromadb
import httpx
import pytest
from chromadb.config import Settings
from live import (
    CHROMA,
    IMAGE_CONFIG,
    LOOPBACK,
    Caddy,
    caddy_binary,
    chroma_server,
    tls_proxy,
    wait_until,
)
from vm_fixtures import (
    ACME_EMAIL,
    FQDN,
    TOKEN,
    chroma_environment,
    compose_service,
    pinned_chroma_version,
    unescape_compose,
    vm_files,
)

from components import cloud_config, runtime, runtime_config
from components.runtime import AUTH_HEADERS, AUTHORIZATION, HEARTBEAT_PATH, ProxySite

# chromadb's own HttpClient hands httpx a CA path as a string, which httpx deprecates; not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:`verify=<str>` is deprecated:DeprecationWarning")

WRONG_TOKEN = "WrongToken0123456789abcdefghijklmnop"
SITE = "localhost"
# Where Debian's update-ca-certificates takes local roots from, and where Caddy puts its own.
HOST_TRUST_DIR = Path("/usr/local/share/ca-certificates")
# Every path here is Chroma's, and only the heartbeat may pass without the token.
GUARDED = [
    ("GET", "/api/v2/version"),
    ("GET", "/api/v2/healthcheck"),
    ("GET", "/api/v2/auth/identity"),
    ("GET", "/api/v2/pre-flight-checks"),
    ("GET", "/api/v2/tenants/default_tenant/databases/default_database/collections"),
    ("POST", "/api/v2/tenants/default_tenant/databases/default_database/collections"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/"),
    ("POST", HEARTBEAT_PATH),
    ("GET", HEARTBEAT_PATH + "/"),
]


def other_header(auth_header: str) -> str:
    (other,) = [header for header in AUTH_HEADERS if header != auth_header]
    return other


@contextlib.contextmanager
def proxy_in_front_of(upstream: str, auth_header: str, workdir: Path) -> Iterator[tuple[ProxySite, Caddy]]:
    """A loopback Caddy from the renderer the VM's Caddyfile comes from (checked), in front of `upstream`."""
    vm_caddyfile = vm_files(auth_header)[cloud_config.CADDYFILE]
    assert runtime.render_caddyfile(runtime_config.vm_site(FQDN), auth_header, ACME_EMAIL) == vm_caddyfile
    with tls_proxy(workdir, upstream, auth_header, TOKEN, ACME_EMAIL) as running:
        yield running


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    with chroma_server(tmp_path_factory.mktemp("chroma"), chroma_environment(vm_files())) as server:
        yield server


@pytest.fixture(scope="module", params=AUTH_HEADERS)
def proxy(request, chroma, tmp_path_factory):
    """Caddy in front of the real Chroma, with the token in the header the param names."""
    auth_header = request.param
    with proxy_in_front_of(f"{LOOPBACK}:{chroma.port}", auth_header, tmp_path_factory.mktemp("caddy")) as (
        site,
        caddy,
    ):
        yield auth_header, site, caddy


def https(site: ProxySite, caddy) -> httpx.Client:
    """A client that trusts only Caddy's internal CA."""
    trusted = ssl.create_default_context(cafile=str(caddy.local_ca))
    return httpx.Client(base_url=f"https://{SITE}:{site.https_port}", verify=trusted, timeout=10)


def chroma_client(site: ProxySite, caddy, headers: dict[str, str]):
    return chromadb.HttpClient(
        host=SITE,
        port=site.https_port,
        ssl=True,
        headers=headers,
        settings=Settings(chroma_server_ssl_verify=str(caddy.local_ca), anonymized_telemetry=False),
    )


def test_chromadb_wheel_is_the_pinned_chroma_version():
    assert chromadb.__version__ == pinned_chroma_version(), "the tests must run the Chroma the VM runs"
    assert compose_service(vm_files(), "chroma")["image"] == f"chromadb/chroma:{chromadb.__version__}"


def adapted(caddyfile: str, tmp_path: Path) -> dict:
    """The JSON config real Caddy makes of a Caddyfile."""
    path = tmp_path / "Caddyfile"
    path.write_text(caddyfile, encoding="utf-8")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    command = [caddy_binary(), "adapt", "--config", str(path), "--adapter", "caddyfile"]
    return json.loads(subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout)


def test_without_acme_email_caddy_uses_only_issuers_that_need_none(tmp_path):
    """Caddy's default issuers are Let's Encrypt and ZeroSSL; ZeroSSL fails every attempt without an email."""
    rendered = runtime_config.render_runtime_files(
        site=runtime_config.vm_site(FQDN),
        chroma_version=pinned_chroma_version(),
        auth_header=AUTHORIZATION,
        token=TOKEN,
        otel=None,
        acme_email=None,
    )
    config = adapted(rendered.caddyfile, tmp_path)
    policies = config["apps"]["tls"]["automation"]["policies"]
    issuers = [issuer for policy in policies for issuer in policy.get("issuers", [])]
    assert policies
    assert all(policy.get("issuers") for policy in policies), "an implicit issuer list means ZeroSSL too"
    assert issuers == [{"module": "acme"}], issuers
    with_email = adapted(vm_files()[cloud_config.CADDYFILE], tmp_path)
    assert ACME_EMAIL in json.dumps(with_email["apps"]["tls"])


@pytest.mark.parametrize("auth_header", AUTH_HEADERS)
def test_caddy_accepts_the_vms_exact_caddyfile(auth_header, tmp_path):
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(vm_files(auth_header)[cloud_config.CADDYFILE], encoding="utf-8")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    command = [caddy_binary(), "--config", str(caddyfile), "--adapter", "caddyfile"]
    validate = subprocess.run(
        [command[0], "validate", *command[1:]], capture_output=True, text=True, env=env, check=False
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    adapt = subprocess.run([command[0], "adapt", *command[1:]], capture_output=True, text=True, env=env, check=True)
    servers = json.loads(adapt.stdout)["apps"]["http"]["servers"]
    listeners = {address for server in servers.values() for address in server["listen"]}
    # HTTPS on 443 (and 80 redirects); the health site on loopback only, not on every interface.
    assert listeners == {":443", f"127.0.0.1:{runtime.PROXY_HEALTH_PORT}"}
    assert FQDN in adapt.stdout
    assert "internal" not in adapt.stdout, "the VM gets a public certificate, not Caddy's internal CA"
    assert ACME_EMAIL in adapt.stdout
    # The token is read at each request from the file the proxy's directory mount holds, never from the config.
    assert f'"{{file.{runtime.PROXY_TOKEN_FILE}}}"' in adapt.stdout
    assert TOKEN not in adapt.stdout


def test_heartbeat_is_open_without_a_token(proxy):
    _, site, caddy = proxy
    with https(site, caddy) as client:
        response = client.get(HEARTBEAT_PATH)
        head = client.head(HEARTBEAT_PATH)
    assert response.status_code == 200
    assert "nanosecond heartbeat" in response.json()
    assert head.status_code == 200, "HEAD of the heartbeat is treated like GET"


@pytest.mark.parametrize(("method", "path"), GUARDED)
def test_every_other_path_needs_the_right_token(proxy, method, path):
    auth_header, site, caddy = proxy
    with https(site, caddy) as client:
        no_token = client.request(method, path)
        wrong_token = client.request(method, path, headers={auth_header: runtime.auth_value(auth_header, WRONG_TOKEN)})
        right_token_wrong_header = client.request(
            method, path, headers={other_header(auth_header): runtime.auth_value(other_header(auth_header), TOKEN)}
        )
        bare_token_in_authorization = client.request(method, path, headers={AUTHORIZATION: TOKEN})
    assert no_token.status_code == 401
    assert "WWW-Authenticate" in no_token.headers
    assert wrong_token.status_code == 401
    assert right_token_wrong_header.status_code == 401, f"only {auth_header} carries the token"
    if auth_header == AUTHORIZATION:
        assert bare_token_in_authorization.status_code == 401, "Authorization needs the Bearer scheme"


def test_right_token_reaches_chroma(proxy):
    auth_header, site, caddy = proxy
    with https(site, caddy) as client:
        response = client.get("/api/v2/version", headers={auth_header: runtime.auth_value(auth_header, TOKEN)})
    assert response.status_code == 200
    assert response.json() == "1.0.0", "Chroma 1.x answers its version with a fixed 1.0.0"


def test_chromadb_client_round_trip_through_the_proxy(proxy, chroma):
    auth_header, site, caddy = proxy
    assert site.https_port != chroma.port
    client = chroma_client(site, caddy, {auth_header: runtime.auth_value(auth_header, TOKEN)})
    name = f"round-trip-{auth_header.lower()}"
    collection = client.create_collection(name, embedding_function=None)
    collection.upsert(
        ids=["north", "east", "south"],
        embeddings=[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]],
        documents=["up", "right", "down"],
    )
    nearest = collection.query(query_embeddings=[[0.9, 0.1, 0.0]], n_results=1)
    assert nearest["ids"] == [["east"]]
    assert collection.count() == 3
    # The proxy forwarded to this Chroma: its own port, reached directly, sees the collection.
    direct = chromadb.HttpClient(host=LOOPBACK, port=chroma.port, settings=Settings(anonymized_telemetry=False))
    assert name in [listed.name for listed in direct.list_collections()]
    client.delete_collection(name)
    assert name not in [listed.name for listed in direct.list_collections()]


def test_chromadb_client_without_the_right_header_is_refused(proxy):
    auth_header, site, caddy = proxy
    for headers in (
        {},
        {auth_header: runtime.auth_value(auth_header, WRONG_TOKEN)},
        {other_header(auth_header): runtime.auth_value(other_header(auth_header), TOKEN)},
    ):
        # The client turns the proxy's plain-text 401 body into a ValueError.
        with pytest.raises(ValueError, match=r"^Unauthorized$"):
            chroma_client(site, caddy, headers).list_collections()


def test_https_is_verified_against_caddys_internal_ca(proxy):
    _, site, caddy = proxy
    # Public roots only (certifi's bundle), so the result does not depend on this host's trust store.
    public_roots = ssl.create_default_context(cafile=certifi.where())
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{SITE}:{site.https_port}{HEARTBEAT_PATH}", verify=public_roots, timeout=10)
    with https(site, caddy) as client:
        assert client.get(HEARTBEAT_PATH).status_code == 200


def test_internal_ca_stays_out_of_the_hosts_trust_store(proxy):
    _, site, caddy = proxy
    with https(site, caddy) as client:
        client.get(HEARTBEAT_PATH)
    root = caddy.local_ca.read_text(encoding="utf-8").strip()
    # Caddy installs its root a moment after it starts; give it that moment before looking.
    time.sleep(3)
    installed = [path for path in HOST_TRUST_DIR.glob("*.crt") if path.read_text(encoding="utf-8").strip() == root]
    assert installed == [], "a test proxy must not make this machine trust its CA"


def test_plain_http_redirects_to_https(proxy):
    _, site, caddy = proxy
    response = httpx.get(f"http://{SITE}:{site.http_port}{HEARTBEAT_PATH}", timeout=10)
    assert response.status_code in (301, 308)
    location = urllib.parse.urlsplit(response.headers["Location"])
    assert (location.scheme, location.hostname, location.path) == ("https", SITE, HEARTBEAT_PATH)
    # Caddy leaves its own https_port out of the redirect (on the VM that is 443); follow it there.
    assert location.port is None
    with https(site, caddy) as client:
        assert client.get(location.path).status_code == 200


@pytest.mark.parametrize("auth_header", AUTH_HEADERS)
def test_proxy_strips_the_token_before_the_upstream(auth_header, tmp_path):
    received: list[dict[str, str]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            received.append(dict(self.headers))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer((LOOPBACK, 0), Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with proxy_in_front_of(f"{LOOPBACK}:{upstream.server_port}", auth_header, tmp_path) as (site, caddy):
            with https(site, caddy) as client:
                status = client.get("/api/v2/version", headers={auth_header: runtime.auth_value(auth_header, TOKEN)})
            assert status.status_code == 200
    finally:
        upstream.shutdown()
    (headers,) = received
    assert auth_header.lower() not in {name.lower() for name in headers}
    assert TOKEN not in json.dumps(headers)


@contextlib.contextmanager
def network_namespace():
    """A fresh network namespace with only loopback, like a container's: 8000, 80 and 443 are free."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip")):
        pytest.skip("needs root, unshare, nsenter (util-linux) and ip (iproute2) for a network namespace")
    holder = subprocess.Popen(
        ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && exec sleep infinity"], start_new_session=True
    )
    enter = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
    try:
        wait_until(
            lambda: (
                "UP" in subprocess.run([*enter, "ip", "-o", "link", "show", "lo"], capture_output=True).stdout.decode()
            ),
            10,
            "loopback in the new network namespace",
            holder,
        )
        yield enter
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def started(command: list[str], env: dict[str, str], log):
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)


def test_compose_health_checks_pass_unchanged_against_the_real_servers(tmp_path):
    """Each health check, exactly as the compose file has it, in a namespace with the image's ports.

    Docker runs a container's health check inside the container's network namespace. Here a
    fresh namespace plays that part, so Chroma listens on the image's own port 8000 and Caddy's
    health listener on its rendered port, and neither command needs a port changed. busybox
    stands in for the Alpine image's wget, which is busybox's.
    """
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (apt-get install busybox); .ci/run installs it")
    files = vm_files()
    chroma_check = [unescape_compose(part) for part in compose_service(files, "chroma")["healthcheck"]["test"]]
    proxy_check = [unescape_compose(part) for part in compose_service(files, "proxy")["healthcheck"]["test"]]
    assert chroma_check[0] == proxy_check[0] == "CMD"
    assert proxy_check[1] == "wget"
    chroma_probe, proxy_probe = chroma_check[1:], [busybox, *proxy_check[1:]]

    (tmp_path / "config.yaml").write_text(IMAGE_CONFIG, encoding="utf-8")
    site = ProxySite(site_address=f"http://{SITE}", upstream=f"{LOOPBACK}:{runtime.CHROMA_PORT}")
    (tmp_path / "Caddyfile").write_text(runtime.render_caddyfile(site, AUTHORIZATION), encoding="utf-8")
    base_env = {key: value for key, value in os.environ.items() if not key.startswith(("CHROMA_", "OTEL_"))}
    chroma_env = {
        **base_env,
        **chroma_environment(files),
        "CHROMA_PERSIST_PATH": str(tmp_path / "data"),
        "ANONYMIZED_TELEMETRY": "False",
    }
    caddy_env = {**base_env, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "caddy-data")}

    # The container's /data is this test's data folder; the guard's ready file goes there.
    probe_env = {**os.environ, "CHROMA_DATA_DIR": str(tmp_path / "data")}

    def passes(enter, probe) -> bool:
        run = subprocess.run([*enter, *probe], capture_output=True, timeout=10, check=False, env=probe_env)
        return run.returncode == 0

    with network_namespace() as enter, (tmp_path / "servers.log").open("w") as log:
        assert not passes(enter, chroma_probe), "nothing listens yet, so the check must fail"
        assert not passes(enter, proxy_probe), "nothing listens yet, so the check must fail"
        with started([*enter, str(CHROMA), "run", str(tmp_path / "config.yaml")], chroma_env, log) as chroma:
            heartbeat_only = [*chroma_probe[:-1], chroma_probe[-1].rsplit(" && [[ -f", 1)[0]]
            wait_until(lambda: passes(enter, heartbeat_only), 60, "Chroma's heartbeat", chroma)
            assert not passes(enter, chroma_probe), "healthy only once the guard marked this start ready"
            (tmp_path / "data" / runtime.READY_FILE).write_text("start-1\n")
            wait_until(lambda: passes(enter, chroma_probe), 60, "Chroma's compose health check", chroma)
            command = [*enter, caddy_binary(), "run", "--config", str(tmp_path / "Caddyfile"), "--adapter", "caddyfile"]
            with started(command, caddy_env, log) as caddy:
                wait_until(lambda: passes(enter, proxy_probe), 30, "the proxy's compose health check", caddy)
        assert not passes(enter, chroma_probe), "Chroma is stopped, so its check must fail again"


def async_call(site: ProxySite, call, **kwargs):
    """`call(client)` with chromadb's AsyncHttpClient to the proxy, on a fresh event loop."""
    loop = asyncio.new_event_loop()

    async def run():
        client = await chromadb.AsyncHttpClient(host=SITE, port=site.https_port, ssl=True, **kwargs)
        return await call(client)

    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def test_async_client_works_with_the_token_as_a_header_and_not_through_settings(proxy):
    """What README's async example relies on: a header works; a token in Settings is ignored (401)."""
    auth_header, site, caddy = proxy
    verify = {"chroma_server_ssl_verify": str(caddy.local_ca), "anonymized_telemetry": False}
    header = {auth_header: runtime.auth_value(auth_header, TOKEN)}
    listed = async_call(
        site, lambda client: client.list_collections(limit=1), headers=header, settings=Settings(**verify)
    )
    assert isinstance(listed, list)
    through_settings = Settings(
        **verify,
        chroma_client_auth_provider="chromadb.auth.token_authn.TokenAuthClientProvider",
        chroma_client_auth_credentials=TOKEN,
        chroma_auth_token_transport_header=auth_header,
    )
    # chromadb raises a bare Exception with the proxy's 401 body.
    with pytest.raises(Exception, match=r"^Unauthorized$"):
        async_call(site, lambda client: client.list_collections(limit=1), settings=through_settings)


def test_async_client_verifies_tls_only_when_told_to(proxy):
    """AsyncHttpClient passes verify=False unless chroma_server_ssl_verify is set: README says to set it."""
    auth_header, site, _ = proxy
    header = {auth_header: runtime.auth_value(auth_header, TOKEN)}
    # Caddy's internal CA is in no trust store here, yet the async client's default accepts it.
    unverified = Settings(anonymized_telemetry=False)
    assert async_call(site, lambda client: client.heartbeat(), headers=header, settings=unverified) > 0
    verified = Settings(chroma_server_ssl_verify=True, anonymized_telemetry=False)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        async_call(site, lambda client: client.heartbeat(), headers=header, settings=verified)
