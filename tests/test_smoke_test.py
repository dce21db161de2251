"""scripts/smoke_test.py against the real pair: `caddy run` on the rendered Caddyfile in front of `chroma run`.

Also against Chroma with no proxy, a wrong token, a CA that does not sign the certificate, an
endpoint that never answers, and a fake `pulumi` on PATH for --stack. Every run checks that the
token appears nowhere in the output.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import certifi
import pytest
from live import Caddy, Chroma, chroma_server, free_port, tls_proxy

from components.runtime import AUTHORIZATION, HEARTBEAT_PATH, X_CHROMA_TOKEN
from scripts import smoke_test

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "smoke_test.py"
TOKEN = "SmokeToken-0123456789abcdefghijklmnopqrstu"
ENV_VARS = ("CHROMA_ENDPOINT", "CHROMA_TOKEN", "CHROMA_AUTH_HEADER")
STACK_EXPORTS = {
    "endpoint": None,  # these two point at the live deployment in the test
    "heartbeatUrl": None,
    "fqdn": "localhost",
    "publicIp": "127.0.0.1",
    "authHeader": AUTHORIZATION,
    "authToken": TOKEN,
    "chromaVersion": "1.5.9",
    "dataDiskId": "/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/disks/chroma-data",
}


@dataclass
class Deployment:
    """Caddy with `tls internal` for localhost in front of a `chroma run`, as a deploy would wire them."""

    chroma: Chroma
    caddy: Caddy
    https_port: int
    auth_header: str

    @property
    def endpoint(self) -> str:
        return f"https://localhost:{self.https_port}"


@contextlib.contextmanager
def proxied(workdir: Path, chroma: Chroma, auth_header: str) -> Iterator[Deployment]:
    """The rendered Caddyfile, run by caddy on loopback ports."""
    with tls_proxy(workdir, f"127.0.0.1:{chroma.port}", auth_header, TOKEN) as (site, caddy):
        assert "skip_install_trust" in caddy.caddyfile.read_text(), "Caddy must not add its CA to the trust store"
        yield Deployment(chroma=chroma, caddy=caddy, https_port=site.https_port, auth_header=auth_header)


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chroma]:
    with chroma_server(tmp_path_factory.mktemp("chroma"), env={}) as server:
        yield server


@pytest.fixture(scope="module")
def deployment(chroma: Chroma, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with proxied(tmp_path_factory.mktemp("caddy"), chroma, AUTHORIZATION) as running:
        yield running


@pytest.fixture(autouse=True)
def no_chroma_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's CHROMA_* variables must not leak into a test."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@dataclass
class Outcome:
    """One run of the smoke test."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)

    def check(self, name: str) -> dict:
        return next(check for check in self.json()["checks"] if check["name"] == name)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Outcome:
    """main() in this process; asserts that the token is printed nowhere."""
    code = smoke_test.main(list(argv))
    captured = capsys.readouterr()
    outcome = Outcome(code, captured.out, captured.err)
    assert TOKEN not in outcome.stdout + outcome.stderr, "the token was printed"
    return outcome


def collections_left(chroma: Chroma) -> list[str]:
    """Names of the smoke test's collections still on the server, asked of Chroma directly."""
    url = f"{chroma.url}/api/v2/tenants/default_tenant/databases/default_database/collections"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        names = [collection["name"] for collection in json.load(response)]
    return [name for name in names if name.startswith(smoke_test.COLLECTION_PREFIX)]


# --- A correct deployment ---------------------------------------------------------------------


def test_correct_deployment_passes_every_check(capsys: pytest.CaptureFixture[str], deployment: Deployment) -> None:
    outcome = run(
        capsys,
        "--endpoint", deployment.endpoint, "--token", TOKEN,
        "--ca-cert", str(deployment.caddy.local_ca), "--wait", "10", "--json",
    )  # fmt: skip

    assert outcome.code == 0, outcome.stdout
    report = outcome.json()
    assert report["ok"] is True
    assert [check["name"] for check in report["checks"]] == list(smoke_test.CHECKS)
    assert all(check["ok"] is True for check in report["checks"]), report
    assert all(set(check) == {"name", "ok", "seconds", "detail"} for check in report["checks"])
    assert re.search(r"valid for localhost, expires in \d+\.\d days", outcome.check("tls")["detail"])
    assert outcome.check("locked")["detail"] == "no token 401, wrong token 401, token 200 (Authorization)"
    assert "10/10 nearest neighbours right, count 300, deleted" in outcome.check("data")["detail"]
    assert outcome.check("data")["detail"].endswith(
        "; async client: 10/10 nearest neighbours right, count 300, deleted"
    ), "the token, sent as a header, works for chromadb's async client too"
    assert re.fullmatch(r"p50 [\d.]+ ms, p95 [\d.]+ ms over 20 queries", outcome.check("latency")["detail"])
    assert collections_left(deployment.chroma) == [], "the smoke test left its collections behind"


def test_token_in_x_chroma_token_from_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    chroma: Chroma,
    tmp_path: Path,
) -> None:
    with proxied(tmp_path, chroma, X_CHROMA_TOKEN) as other:
        monkeypatch.setenv("CHROMA_ENDPOINT", other.endpoint)
        monkeypatch.setenv("CHROMA_TOKEN", TOKEN)
        monkeypatch.setenv("CHROMA_AUTH_HEADER", X_CHROMA_TOKEN)
        outcome = run(capsys, "--ca-cert", str(other.caddy.local_ca), "--json")

    assert outcome.code == 0, outcome.stdout
    assert outcome.check("locked")["detail"].endswith(f"token 200 ({X_CHROMA_TOKEN})")


def test_stack_exports_as_a_subprocess_with_aligned_output(deployment: Deployment, tmp_path: Path) -> None:
    live = {"endpoint": deployment.endpoint, "heartbeatUrl": deployment.endpoint + HEARTBEAT_PATH}
    calls = fake_pulumi(tmp_path, exports={**STACK_EXPORTS, **live})
    environment = {key: value for key, value in os.environ.items() if key not in ENV_VARS}
    environment["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{environment['PATH']}"

    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--stack", "dev", "--ca-cert", str(deployment.caddy.local_ca), "--wait", "10"],
        cwd=tmp_path,  # not the project root: the script finds the project (and pulumi's cwd) itself
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert TOKEN not in finished.stdout + finished.stderr
    assert json.loads(calls.read_text()) == {
        "argv": ["stack", "output", "--json", "--show-secrets", "--stack", "dev"],
        "cwd": str(ROOT),
    }
    lines = finished.stdout.splitlines()
    assert lines[0] == f"Smoke test of {deployment.endpoint} (from stack dev, token in Authorization)"
    check_lines = lines[1:-1]
    assert [line.split()[0] for line in check_lines] == list(smoke_test.CHECKS)
    columns = {(line.index(" ok "), re.match(r"  \S+ +ok +\d+\.\ds  ", line).end()) for line in check_lines}
    assert len(columns) == 1, f"status and time columns not aligned:\n{finished.stdout}"
    assert lines[-1] == "PASS: all checks passed"


# --- Deployments that must fail ---------------------------------------------------------------


def test_chroma_without_proxy_fails_locked(capsys: pytest.CaptureFixture[str], chroma: Chroma) -> None:
    outcome = run(capsys, "--endpoint", chroma.url, "--token", TOKEN, "--wait", "10", "--json")

    assert outcome.code == 1
    assert outcome.check("reachable")["ok"] is True
    assert outcome.check("tls")["ok"] is True  # http: nothing to verify, and the detail says so
    assert "unencrypted" in outcome.check("tls")["detail"]
    locked = outcome.check("locked")
    assert locked["ok"] is False
    assert locked["detail"].startswith("serves data with no token: GET /api/v2/tenants/")
    assert [outcome.check(name)["ok"] for name in ("data", "latency")] == [None, None], "ran after a failure"
    assert collections_left(chroma) == [], "wrote data to a deployment that is not locked"


def test_chroma_without_proxy_names_locked_for_people(capsys: pytest.CaptureFixture[str], chroma: Chroma) -> None:
    outcome = run(capsys, "--endpoint", chroma.url, "--token", TOKEN, "--wait", "10")

    assert outcome.code == 1
    assert re.search(r"^  locked +FAIL +\d+\.\ds  serves data with no token", outcome.stdout, re.MULTILINE)
    assert outcome.stdout.splitlines()[-1] == "FAIL: the locked check failed"


def test_wrong_token_fails(capsys: pytest.CaptureFixture[str], deployment: Deployment) -> None:
    wrong = "NotTheToken-0123456789abcdefghijklmnopqrst"
    outcome = run(
        capsys,
        "--endpoint", deployment.endpoint, "--token", wrong,
        "--ca-cert", str(deployment.caddy.local_ca), "--wait", "10", "--json",
    )  # fmt: skip

    assert outcome.code == 1
    assert outcome.check("locked")["ok"] is False
    assert outcome.check("locked")["detail"] == (
        "the token was rejected too (401 with it in Authorization): "
        "check --token (or CHROMA_TOKEN) and --auth-header (or CHROMA_AUTH_HEADER)"
    )
    assert wrong not in outcome.stdout + outcome.stderr


def test_certificate_from_another_ca_fails_tls(capsys: pytest.CaptureFixture[str], deployment: Deployment) -> None:
    # certifi's public roots do not sign Caddy's internal certificate.
    outcome = run(
        capsys,
        "--endpoint", deployment.endpoint, "--token", TOKEN, "--ca-cert", certifi.where(), "--wait", "10", "--json",
    )  # fmt: skip

    assert outcome.code == 1
    assert outcome.check("reachable")["ok"] is True
    assert outcome.check("tls")["ok"] is False
    assert outcome.check("tls")["detail"].startswith("certificate not valid for localhost: unable to get local issuer")
    assert [outcome.check(name)["detail"] for name in ("locked", "data", "latency")] == ["not run: tls failed"] * 3


def test_p95_above_the_limit_fails_latency(capsys: pytest.CaptureFixture[str], deployment: Deployment) -> None:
    outcome = run(
        capsys,
        "--endpoint", deployment.endpoint, "--token", TOKEN, "--ca-cert", str(deployment.caddy.local_ca),
        "--max-p95-ms", "0.001", "--json",
    )  # fmt: skip

    assert outcome.code == 1
    assert [check["ok"] for check in outcome.json()["checks"]] == [True, True, True, True, False]
    assert "p95 above --max-p95-ms 0.001" in outcome.check("latency")["detail"]
    assert collections_left(deployment.chroma) == []


def test_endpoint_that_never_answers_fails_after_the_wait(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    outcome = run(capsys, "--endpoint", f"https://127.0.0.1:{free_port()}", "--token", TOKEN, "--wait", "2", "--json")
    elapsed = time.monotonic() - started

    assert outcome.code == 1
    assert 2 <= elapsed < 10, f"took {elapsed:.1f}s for --wait 2"
    reachable = outcome.check("reachable")
    assert reachable["ok"] is False
    assert re.fullmatch(r"no heartbeat within 2s \(\d+ tries\); last error: connection refused", reachable["detail"])
    progress = outcome.stderr.splitlines()
    assert len(progress) >= 2, outcome.stderr
    assert re.fullmatch(r"  reachable   wait +\d+\.\ds  try 1: connection refused; next try in 1\.0s", progress[0])
    assert re.match(r"  reachable   wait +\d+\.\ds  try 2: ", progress[1])


def test_proxy_up_but_chroma_not_yet_keeps_retrying(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # What a booting VM looks like once Caddy is up and Chroma is not: 502 until the wait runs out.
    # --wait 3, not 1: the first pause is the full 1.0s backoff unless the first try takes 2s.
    not_started = Chroma(port=free_port(), persist_path=tmp_path / "data", log=tmp_path / "chroma.log")
    with proxied(tmp_path / "caddy", not_started, AUTHORIZATION) as booting:
        outcome = run(capsys, "--endpoint", booting.endpoint, "--token", TOKEN, "--wait", "3", "--json")

    assert outcome.code == 1
    assert outcome.check("reachable")["detail"].endswith("last error: heartbeat answered 502")
    assert "try 1: heartbeat answered 502; next try in 1.0s" in outcome.stderr


# --- Cleanup when a step fails ----------------------------------------------------------------


def _wrong_expectations(vectors: list[list[float]]) -> list[tuple[str, list[float]]]:
    return [("no-such-id", list(vectors[0]))]


def _ragged_vectors(count: int = smoke_test.VECTOR_COUNT) -> list[list[float]]:
    return [[0.1] * smoke_test.VECTOR_DIMENSIONS for _ in range(count - 1)] + [[0.1, 0.2]]


@pytest.mark.parametrize(
    ("patched", "replacement", "failure"),
    [
        ("neighbour_probes", _wrong_expectations, "query: wrong nearest neighbour for 1/1: no-such-id gave v0000"),
        ("reference_vectors", _ragged_vectors, "upsert failed: "),
    ],
    ids=["wrong-neighbour", "upsert-error"],
)
def test_data_check_deletes_its_collection_when_a_step_fails(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    deployment: Deployment,
    patched: str,
    replacement: object,
    failure: str,
) -> None:
    monkeypatch.setattr(smoke_test, patched, replacement)

    outcome = run(
        capsys, "--endpoint", deployment.endpoint, "--token", TOKEN,
        "--ca-cert", str(deployment.caddy.local_ca), "--json",
    )  # fmt: skip

    assert outcome.code == 1
    assert outcome.check("data")["ok"] is False
    assert outcome.check("data")["detail"].startswith(failure)
    assert collections_left(deployment.chroma) == [], "the failed data check left its collection behind"


def test_chroma_client_requests_have_a_timeout(deployment: Deployment) -> None:
    # chromadb 1.5.9 makes its httpx client with timeout=None; the smoke test must bound it.
    target = smoke_test.Target(
        "https", "localhost", deployment.https_port, TOKEN, AUTHORIZATION, deployment.caddy.local_ca, "test"
    )
    client = smoke_test.open_client(target)
    try:
        assert client._server._session.timeout.read == smoke_test.REQUEST_TIMEOUT_SECONDS
    finally:
        client.close()


# --- Usage and configuration: exit 2 ----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environment", "message"),
    [
        ([], {}, "no endpoint: pass --stack NAME, or --endpoint URL (or set CHROMA_ENDPOINT)"),
        (["--endpoint", "https://chroma.example.com"], {}, "no token: pass --token TOKEN or set CHROMA_TOKEN"),
        ([], {"CHROMA_ENDPOINT": "https://chroma.example.com"}, "no token"),
        (["--endpoint", "ftp://chroma.example.com", "--token", TOKEN], {}, "must look like https://host[:port]"),
        (["--endpoint", "https://chroma.example.com/api", "--token", TOKEN], {}, "with nothing after it"),
        (["--endpoint", f"https://u:{TOKEN}@chroma.example.com", "--token", TOKEN], {}, "must not carry credentials"),
        (["--endpoint", "https://h", "--token", TOKEN, "--auth-header", "X-Api-Key"], {}, "invalid choice"),
        (
            ["--endpoint", "https://h", "--token", TOKEN],
            {"CHROMA_AUTH_HEADER": "X-Api-Key"},
            "the auth header must be one of Authorization, X-Chroma-Token",
        ),
        (["--stack", "dev", "--endpoint", "https://h"], {}, "--stack reads the endpoint and token"),
        (["--endpoint", "https://h", "--token", TOKEN, "--ca-cert", "/nonexistent/ca.pem"], {}, "no such file"),
        (["--endpoint", "https://h", "--token", TOKEN, "--wait", "-1"], {}, "must be a number of seconds >= 0"),
    ],
    ids=[
        "nothing",
        "no-token",
        "env-endpoint-no-token",
        "bad-scheme",
        "path",
        "credentials-in-url",
        "bad-header-flag",
        "bad-header-env",
        "stack-and-endpoint",
        "missing-ca",
        "negative-wait",
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    environment: dict[str, str],
    message: str,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)

    outcome = run(capsys, *argv)

    assert outcome.code == 2
    assert message in outcome.stderr
    assert outcome.stdout == ""


def test_usage_error_in_json_mode_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    outcome = run(capsys, "--endpoint", "https://chroma.example.com", "--json")

    assert outcome.code == 2
    assert outcome.json() == {"ok": False, "error": outcome.stderr.split("error: ", 1)[1].strip(), "checks": []}
    assert outcome.json()["error"].startswith("no token")


def fake_pulumi(tmp_path: Path, exports: dict | None = None, exit_code: int = 0, stderr: str = "") -> Path:
    """A `pulumi` in tmp_path/bin that prints `exports` as JSON; returns the file it records its call in."""
    calls = tmp_path / "pulumi-call.json"
    script = tmp_path / "bin" / "pulumi"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"open({str(calls)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}))\n"
        f"print({json.dumps(exports)!r})\n"
        f"sys.stderr.write({stderr!r})\n"
        f"sys.exit({exit_code})\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    return calls


def test_stack_without_token_export_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = fake_pulumi(tmp_path, exports={"endpoint": "https://chroma.example.com", "authHeader": AUTHORIZATION})
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    outcome = run(capsys, "--stack", "dev")

    assert calls.exists(), "the fake pulumi was not called"
    assert outcome.code == 2
    assert "stack 'dev' has no authToken export: run `pulumi up --stack dev` first" in outcome.stderr


def test_stack_that_pulumi_cannot_read_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pulumi(tmp_path, exit_code=255, stderr="error: no stack named 'nope' found\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    outcome = run(capsys, "--stack", "nope")

    assert outcome.code == 2
    assert "`pulumi stack output --stack nope` failed (exit 255): error: no stack named 'nope' found" in outcome.stderr


def test_stack_without_pulumi_installed_exits_2_naming_the_fix(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no pulumi anywhere

    outcome = run(capsys, "--stack", "dev")

    assert outcome.code == 2
    assert "--stack needs the pulumi CLI, which is not on PATH" in outcome.stderr
    assert "https://www.pulumi.com/docs/install/" in outcome.stderr
    assert "pass --endpoint and --token" in outcome.stderr


# --- Tokens that cannot go in a header, and every form a token can be quoted in ------------------

# Distinctive letters, so any 4-character piece of them found in the output is a leak, not chance.
BAD_TOKENS = {
    "crlf": "Qz7kVx2mWq9pLr4tJn6y\r\n",
    "lf": "Qz7kVx2mWq9pLr4tJn6y\n",
    "cr-inside": "Qz7kVx2m\rWq9pLr4tJn6y",
    "non-ascii": "Qz7kVx2mWq9\u00e9pLr4tJn6y",
    "tab": "\tQz7kVx2mWq9pLr4tJn6y",
}


def pieces(token: str, length: int = 4) -> set[str]:
    """Every run of `length` characters of the token, in raw and escaped forms."""
    forms = {token, repr(token)[1:-1], json.dumps(token)[1:-1], token.encode("unicode_escape").decode()}
    return {form[start : start + length] for form in forms for start in range(len(form) - length + 1)}


def leaked(token: str, text: str) -> set[str]:
    return {piece for piece in pieces(token) if piece in text}


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    """A loopback port that accepts connections but answers nothing; shows whether anyone connected."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def connected(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


@pytest.mark.parametrize("token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
@pytest.mark.parametrize("given_by", ["flag", "environment", "stack"])
def test_token_that_cannot_be_a_header_is_refused_before_any_request(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    token: str,
    given_by: str,
) -> None:
    with listener() as server:
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
        if given_by == "flag":
            argv = ["--endpoint", endpoint, "--token", token]
        elif given_by == "environment":
            monkeypatch.setenv("CHROMA_TOKEN", token)
            argv = ["--endpoint", endpoint]
        else:
            fake_pulumi(tmp_path, exports={"endpoint": endpoint, "authToken": token})
            monkeypatch.setenv("PATH", str(tmp_path / "bin"))
            argv = ["--stack", "dev"]
        for json_mode in ([], ["--json"]):
            outcome = run(capsys, *argv, "--wait", "0", *json_mode)
            assert outcome.code == 2, outcome.stdout + outcome.stderr
            assert "cannot be sent in an HTTP header" in outcome.stderr
            assert not leaked(token, outcome.stdout + outcome.stderr), "part of the token was printed"
        assert not connected(server), "a request was made with a token that cannot be sent"


def test_every_quoted_form_of_the_token_is_redacted() -> None:
    token = BAD_TOKENS["crlf"]
    report = smoke_test.Report(json_enabled=False)
    report.hide(token)
    errors = [
        f"Invalid header value {('Bearer ' + token).encode()!r}",
        f"header {token!r} rejected",
        json.dumps({"token": token}),
        f"url {urllib.parse.quote(token)}",
        f"first line only: {token.splitlines()[0]}",
        token.encode("unicode_escape").decode(),
    ]
    for error in errors:
        redacted = report.redact(error)
        assert not leaked(token, redacted), f"{error!r} became {redacted!r}"
        assert "***" in redacted


# --- A server that answers the heartbeat and then stalls ------------------------------------------


@contextlib.contextmanager
def stalling_server(stall_from: str) -> Iterator[str]:
    """Answers the heartbeat (and, with stall_from="data", the locked probe as a proxy would), then stalls.

    A stalled request is read and never answered until the test ends.
    """
    stop = threading.Event()
    locked_path = smoke_test.LOCKED_PROBE_PATH

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == HEARTBEAT_PATH:
                self.answer(200, b'{"nanosecond heartbeat": 1}')
            elif self.path == locked_path and stall_from == "data":
                right = self.headers.get(AUTHORIZATION) == f"Bearer {TOKEN}"
                self.answer(200 if right else 401, b"[]" if right else b"Unauthorized")
            else:
                stop.wait(120)

        do_POST = do_GET  # noqa: N815 - http.server's method name

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        stop.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("stall_from", "failed", "detail"),
    [
        ("locked", "locked", "request with no token failed: timed out"),
        ("data", "data", "connect: no answer within 6s"),
    ],
)
def test_server_that_stalls_after_the_heartbeat_fails_in_bounded_time(
    tmp_path: Path, stall_from: str, failed: str, detail: str
) -> None:
    wait, timeout = 2, 2
    with stalling_server(stall_from) as endpoint:
        started = time.monotonic()
        finished = subprocess.run(
            [sys.executable, str(SCRIPT), "--endpoint", endpoint, "--wait", str(wait), "--timeout", str(timeout)],
            env={**os.environ, "CHROMA_TOKEN": TOKEN},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        took = time.monotonic() - started
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert f"FAIL: the {failed} check failed" in finished.stdout
    assert re.search(rf"  {failed} +FAIL +[\d.]+s  {re.escape(detail)}", finished.stdout), finished.stdout
    # The heartbeat, then at most the client's construction (3 timeouts), plus start-up.
    assert took < wait + smoke_test.CONNECT_TIMEOUTS * timeout + 15, f"took {took:.1f}s"
    assert TOKEN not in finished.stdout + finished.stderr


# --- Pure parts -------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    samples = [float(value) for value in range(20, 0, -1)]

    assert smoke_test.percentile(samples, 0.50) == 10.0
    assert smoke_test.percentile(samples, 0.95) == 19.0
    assert smoke_test.percentile([7.0], 0.95) == 7.0


def test_resolve_sends_only_that_host_to_the_address() -> None:
    """--resolve HOST:IP, for a VM behind a port forward before its DNS exists (the VM tier uses it)."""
    with smoke_test.resolved("chroma.invalid", "127.0.0.1"):
        assert {info[4][0] for info in socket.getaddrinfo("chroma.invalid", 443, socket.AF_INET)} == {"127.0.0.1"}
        # As the async client (anyio) asks: the name as IDNA bytes.
        assert {info[4][0] for info in socket.getaddrinfo(b"chroma.invalid", 443, socket.AF_INET)} == {"127.0.0.1"}
        assert socket.getaddrinfo("localhost", 443, socket.AF_INET)[0][4][0] == "127.0.0.1"
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("chroma.invalid", 443, socket.AF_INET)


def test_resolve_without_an_address_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert smoke_test.main(["--endpoint", "https://chroma.invalid", "--token", "t", "--resolve", "chroma.invalid"]) == 2
    assert "HOST:IP" in capsys.readouterr().err
