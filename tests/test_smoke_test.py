"""scripts/smoke_test.py against the real pair: `caddy run` on the rendered Caddyfile in front of `chroma run`.

Also against Chroma with no proxy, a wrong token, a CA that does not sign the certificate, an
endpoint that never answers, and a fake `pulumi` on PATH for --stack. Every run checks that the
token appears nowhere in the output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
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
    not_started = Chroma(port=free_port(), persist_path=tmp_path / "data", log=tmp_path / "chroma.log")
    with proxied(tmp_path / "caddy", not_started, AUTHORIZATION) as booting:
        outcome = run(capsys, "--endpoint", booting.endpoint, "--token", TOKEN, "--wait", "1", "--json")

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


# --- Pure parts -------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    samples = [float(value) for value in range(20, 0, -1)]

    assert smoke_test.percentile(samples, 0.50) == 10.0
    assert smoke_test.percentile(samples, 0.95) == 19.0
    assert smoke_test.percentile([7.0], 0.95) == 7.0
