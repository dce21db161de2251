"""Day-2 changes on a running deployment: the VM's own chroma-apply, run unchanged, measured.

The apply script is taken from the rendered cloud-config (exactly the bytes the VM gets) and run
with the environment the run command gives it. It drives real programs: `chroma run` from the
pinned chromadb wheel and a real Caddy with the VM's proxy template on loopback (Caddy's internal
CA instead of ACME, and the token file at its test-folder path), through tests/day2_host.py, which
plays `docker` and `systemctl` (see its docstring for what that stand-in does not show). While each
change is applied, clients send authenticated requests through the proxy without pause, and the test
counts what failed.

The measurements go to build/day2-report.json; README's "Change a running deployment" quotes them.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import ssl
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import day2_host
import httpx
import pytest
import yaml
from live import (
    CHROMA,
    caddy_binary,
    down_seconds,
    free_port,
    loopback_tls_site,
    otlp_sink,
    port_open,
    tls_handshake,
    wait_until,
)
from vm_fixtures import ACME_EMAIL, pinned_chroma_version

from components import cloud_config, runtime, runtime_config
from components.runtime import AUTHORIZATION, HEARTBEAT_PATH, OtelSettings, auth_value

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "build" / "day2-report.json"
OLD_TOKEN = "Day2OldToken0123456789abcdefghijklmn"
NEW_TOKEN = "Day2NewToken9876543210zyxwvutsrqponm"
# A second tag the stand-in registry serves (with the same chroma binary): a version change.
UPGRADE_VERSION = f"{pinned_chroma_version()}-day2"
HEALTHY_WITHIN_SECONDS = 30
# Clients pause this long between requests: about 100 requests a second each.
REQUEST_GAP_SECONDS = 0.01
# Token rotations in a row under load, and the pause between two, so that each stands apart.
ROTATIONS = 12
ROTATION_GAP_SECONDS = 0.5

measurements: dict[str, dict] = {}


@dataclass
class Deployment:
    """One running stand-in VM: the folders that play /etc/chroma and /srv/chroma, and its proxy."""

    root: Path
    site: runtime.ProxySite
    apply_script: Path
    env: dict[str, str]
    version: str = field(default_factory=pinned_chroma_version)
    token: str = OLD_TOKEN
    otel: OtelSettings | None = None
    collection_id: str = ""

    @property
    def config_dir(self) -> Path:
        return self.root / "etc-chroma"

    @property
    def token_file(self) -> Path:
        """The VM's /etc/chroma/proxy/token, which the proxy reads at each request."""
        return self.config_dir / "proxy" / "token"

    @property
    def base_url(self) -> str:
        return f"https://{self.site.site_address}:{self.site.https_port}"

    @property
    def local_ca(self) -> Path:
        return self.root / "caddy" / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    def pid(self, service: str) -> int:
        return json.loads((self.root / "state.json").read_text())["services"][service]["pid"]

    def reloads(self) -> int:
        """How often chroma-apply has asked the proxy container for `caddy reload` (the stand-in counts)."""
        return json.loads((self.root / "state.json").read_text())["reloads"]

    def caddy_loads(self) -> int:
        """How many configs Caddy's admin API was sent after its start (each reload is one POST /load)."""
        log = self.root / "caddy" / "caddy.log"
        return sum('"uri":"/load"' in line for line in log.read_text().splitlines())

    def command(self, **changes) -> runtime_config.RunCommand:
        """The run command for the current settings with `changes`, for the loopback site."""
        settings = {"version": self.version, "token": self.token, "otel": self.otel, **changes}
        files = runtime_config.render_runtime_files(
            site=self.site,
            chroma_version=settings["version"],
            auth_header=AUTHORIZATION,
            token=settings["token"],
            otel=settings["otel"],
            acme_email=ACME_EMAIL,
        )
        return runtime_config.run_command_for(files, settings["version"])

    def apply(self, command: runtime_config.RunCommand) -> subprocess.CompletedProcess:
        """chroma-apply with the run command's parameters as its environment, as Azure's agent runs it."""
        return subprocess.run(
            [str(self.apply_script)],
            env={**self.env, **command.environment()},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    def client(self, token: str | None, keep_alive: bool = True) -> httpx.Client:
        """An httpx client, as chromadb's HttpClient uses, trusting only Caddy's CA.

        With keep_alive (httpx's default, and chromadb's) it reuses its connection; without, every
        request opens a new one. Without a token, each request names its own.
        """
        trusted = ssl.create_default_context(cafile=str(self.local_ca))
        headers = {AUTHORIZATION: auth_value(AUTHORIZATION, token)} if token else {}
        limits = httpx.Limits() if keep_alive else httpx.Limits(max_keepalive_connections=0)
        return httpx.Client(base_url=self.base_url, verify=trusted, headers=headers, timeout=10, limits=limits)

    def count_path(self) -> str:
        return f"/api/v2/tenants/default_tenant/databases/default_database/collections/{self.collection_id}/count"


@dataclass
class Result:
    """One request: when it started and ended, its status (or the error's name), and the token it sent.

    `token_after` is the token in force when the answer came: another one means the request raced a
    rotation.
    """

    start: float
    end: float
    outcome: int | str
    token: str
    token_after: str

    @property
    def raced_a_rotation(self) -> bool:
        return self.token_after != self.token


class Prober(threading.Thread):
    """Sends the collection's count request without pause until stopped; keeps every result.

    With a `token` it always sends that one. Without, it plays a client that always has the token in
    force: before each request it reads the deployed token file (the one the proxy reads), and reads it
    again when the answer comes, so that a request that raced a rotation is known as such.
    """

    def __init__(self, deployment: Deployment, token: str | None = None, keep_alive: bool = True) -> None:
        super().__init__(daemon=True)
        self.deployment = deployment
        self.token = token
        self.keep_alive = keep_alive
        self.results: list[Result] = []
        self.halt = threading.Event()

    def token_in_force(self) -> str:
        return self.token or self.deployment.token_file.read_text().strip()

    def run(self) -> None:
        with self.deployment.client(None, self.keep_alive) as client:
            while not self.halt.is_set():
                token = self.token_in_force()
                headers = {AUTHORIZATION: auth_value(AUTHORIZATION, token)}
                start = time.monotonic()
                try:
                    outcome: int | str = client.get(self.deployment.count_path(), headers=headers).status_code
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                self.results.append(Result(start, time.monotonic(), outcome, token, self.token_in_force()))
                time.sleep(REQUEST_GAP_SECONDS)

    def __enter__(self) -> Prober:
        self.start()
        wait_until(lambda: len(self.results) >= 20, 30, "the prober's first requests")
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(1)  # requests after the change, too
        self.halt.set()
        self.join(timeout=30)

    def dropped(self) -> list[Result]:
        """Requests that got no answer from the proxy's rules: an error, or a 5xx from a missing upstream."""
        return [r for r in self.results if not (isinstance(r.outcome, int) and r.outcome < 500)]

    def per_second(self) -> float:
        return len(self.results) / (self.results[-1].end - self.results[0].start)

    def failed(self) -> list[Result]:
        return [r for r in self.results if r.outcome != 200]

    def refused(self) -> list[Result]:
        return [r for r in self.results if r.outcome == 401]

    def down_seconds(self) -> float:
        """How long Chroma did not answer (live.down_seconds)."""
        return down_seconds([(r.start, r.end, r.outcome == 200) for r in self.results])


def record(change: str, **numbers) -> None:
    measurements[change] = numbers


def record_restart(change: str, seconds: float, prober: Prober) -> None:
    """The figures of a change that restarts Chroma while the prober runs."""
    record(
        change,
        apply_seconds=round(seconds, 2),
        requests=len(prober.results),
        requests_per_second=round(prober.per_second()),
        failed=len(prober.failed()),
        chroma_down_seconds=round(prober.down_seconds(), 2),
        proxy_restarted=False,
    )


def compose_images() -> list[str]:
    compose = yaml.safe_load(cloud_config.render_compose(pinned_chroma_version(), None))
    return [service["image"] for service in compose["services"].values()]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A first apply on a fresh stand-in VM: chroma-apply starts chroma.service, with data in it."""
    root = tmp_path_factory.mktemp("day2")
    chroma_port = free_port()
    # The token file where chroma-apply puts it: the test folder that plays /etc/chroma/proxy.
    token_file = str(root / "etc-chroma" / "proxy" / "token")
    site = dataclasses.replace(
        loopback_tls_site(f"127.0.0.1:{chroma_port}", token_file=token_file),
        admin_socket=str(root / "caddy-admin.sock"),
    )
    for folder in ("etc-chroma", "srv-chroma/data", "srv-chroma/caddy"):
        (root / folder).mkdir(parents=True)
    # What the bootstrap installs under /usr/local (chroma-apply, and any script a container mounts),
    # the very bytes of the VM's cloud-config.
    for path, content in cloud_config.write_files(cloud_config.render_cloud_config()).items():
        if path.startswith("/usr/local/"):
            installed = root / "usr-local" / path.removeprefix("/usr/local/")
            installed.parent.mkdir(parents=True, exist_ok=True)
            installed.write_text(content)
            installed.chmod(0o755)
    (root / "host.json").write_text(
        json.dumps(
            {
                "paths": {
                    "/etc/chroma": str(root / "etc-chroma"),
                    "/srv/chroma": str(root / "srv-chroma"),
                    "/usr/local": str(root / "usr-local"),
                },
                "chroma_port": chroma_port,
                "proxy_health_port": site.health_port,
                "chroma": str(CHROMA),
                "caddy": caddy_binary(),
                # Every image the compose file names, and the tag of the version change.
                "registry": [*compose_images(), runtime.chroma_image(UPGRADE_VERSION)],
            }
        )
    )
    (root / "boot-finished").touch()
    day2_host.install(root / "bin")
    apply_script = root / "usr-local" / cloud_config.APPLY_SCRIPT.removeprefix("/usr/local/")
    env = {
        "PATH": f"{root / 'bin'}:{os.environ['PATH']}",
        day2_host.STATE_VARIABLE: str(root),
        "CHROMA_CONFIG_DIR": str(root / "etc-chroma"),
        "CHROMA_BOOT_FINISHED": str(root / "boot-finished"),
        "CHROMA_HEALTHY_WITHIN_SECONDS": str(HEALTHY_WITHIN_SECONDS),
    }
    running = Deployment(root=root, site=site, apply_script=apply_script, env=env)
    try:
        started = time.monotonic()
        result = running.apply(running.command())
        assert result.returncode == 0, result.stdout + result.stderr
        assert "starting chroma.service" in result.stdout
        assert f"running {runtime.chroma_image(running.version)}" in result.stdout
        assert running.token_file.read_text() == runtime.token_file_content(OLD_TOKEN)
        assert stat.S_IMODE(running.token_file.stat().st_mode) == 0o600, "root only"
        assert OLD_TOKEN not in (running.config_dir / "proxy" / "Caddyfile").read_text()
        wait_until(lambda: port_open(site.https_port), 30, "the proxy's HTTPS port")
        wait_until(running.local_ca.exists, 30, "Caddy's internal CA")
        wait_until(lambda: tls_handshake(site.https_port, running.local_ca, site.site_address), 30, "the certificate")
        record("first apply (new VM, run command's first run)", seconds_to_serving=round(time.monotonic() - started, 1))
        with running.client(OLD_TOKEN) as client:
            created = client.post(
                "/api/v2/tenants/default_tenant/databases/default_database/collections", json={"name": "day2"}
            )
            assert created.status_code == 200, created.text
            running.collection_id = created.json()["id"]
            added = client.post(
                f"/api/v2/tenants/default_tenant/databases/default_database/collections/{running.collection_id}/add",
                json={"ids": ["a", "b"], "embeddings": [[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]},
            )
            assert added.status_code in (200, 201), added.text
        yield running
    finally:
        day2_host.stop_everything(root)
        if measurements:
            REPORT.parent.mkdir(exist_ok=True)
            REPORT.write_text(json.dumps(measurements, indent=2) + "\n")


def count(deployment: Deployment) -> int:
    with deployment.client(deployment.token) as client:
        response = client.get(deployment.count_path())
        assert response.status_code == 200, response.text
        return response.json()


def status_with(deployment: Deployment, token: str) -> int:
    with deployment.client(token) as client:
        return client.get(deployment.count_path()).status_code


def test_the_run_command_script_runs_the_bootstrap_apply_script():
    command = runtime_config.render_run_command(
        fqdn="x.example.com",
        chroma_version="1.5.9",
        auth_header=AUTHORIZATION,
        token=OLD_TOKEN,
        otel=None,
        acme_email=None,
    )
    assert command.script.splitlines()[-1] == f"exec {cloud_config.APPLY_SCRIPT}"
    assert set(command.parameters) == {runtime_config.IMAGE_PARAMETER, runtime_config.CADDYFILE_PARAMETER}
    assert command.parameters[runtime_config.IMAGE_PARAMETER] == "chromadb/chroma:1.5.9"
    assert OLD_TOKEN not in base64.b64decode(command.parameters[runtime_config.CADDYFILE_PARAMETER]).decode()
    assert command.protected_parameters[runtime_config.TOKEN_PARAMETER] == OLD_TOKEN
    guest = runtime_config.as_guest_script(command)
    assert guest.rstrip().endswith(f"exec {cloud_config.APPLY_SCRIPT}")
    assert guest.count("export ") == 4


def rotated_token(index: int) -> str:
    return f"Day2Rotated{index:02d}Token0123456789abcdefghij"


def test_token_rotation_replaces_the_token_file_and_reloads_nothing(deployment):
    """Twelve rotations under load: no request dropped, no reload, nothing restarted.

    The clients always send the token in force (read from the deployed token file before each
    request), two on connections they reuse, as chromadb's client does, two on a new connection per
    request. A 401 is allowed only to a request that raced a rotation: it carried the token that the
    rotation retired, and the new token was in force when its answer came. No client can avoid those,
    since no token is valid both before and after a rotation; they are counted apart, not as drops.
    """
    chroma_pid, caddy_pid = deployment.pid("chroma"), deployment.pid("proxy")
    reloads, caddy_loads = deployment.reloads(), deployment.caddy_loads()
    tokens = [deployment.token] + [rotated_token(index) for index in range(ROTATIONS)]
    apply_seconds = []
    with (
        Prober(deployment) as reused,
        Prober(deployment) as reused_too,
        Prober(deployment, keep_alive=False) as fresh,
        Prober(deployment, keep_alive=False) as fresh_too,
    ):
        for retired, token in itertools.pairwise(tokens):
            started = time.monotonic()
            result = deployment.apply(deployment.command(token=token))
            apply_seconds.append(time.monotonic() - started)
            assert result.returncode == 0, result.stdout + result.stderr
            deployment.token = token
            assert "token replaced; Caddy reads it at each request" in result.stdout
            assert "reloaded" not in result.stdout, "a token change must not reload the proxy"
            assert "recreating" not in result.stdout, "a token change must not touch Chroma"
            assert retired not in result.stdout + result.stderr
            assert token not in result.stdout + result.stderr
            assert status_with(deployment, token) == 200, "the new token works as soon as the apply returns"
            assert status_with(deployment, retired) == 401, "and the retired one no longer does"
            time.sleep(ROTATION_GAP_SECONDS)
    assert (deployment.pid("chroma"), deployment.pid("proxy")) == (chroma_pid, caddy_pid), "nothing restarted"
    assert deployment.reloads() == reloads, "chroma-apply asked the proxy for no reload"
    assert deployment.caddy_loads() == caddy_loads, "Caddy loaded no new config"
    assert stat.S_IMODE(deployment.token_file.stat().st_mode) == 0o600
    assert deployment.token_file.stat().st_uid == os.geteuid(), "owned by whoever applied (root on the VM)"
    probers = {"keep-alive": (reused, reused_too), "new connection": (fresh, fresh_too)}
    for prober in (reused, reused_too, fresh, fresh_too):
        assert prober.dropped() == [], "every request got an answer from the proxy's rules"
        assert {r.outcome for r in prober.results} <= {200, 401}
        for refused in prober.refused():
            assert refused.raced_a_rotation, f"the token in force was refused: {refused}"
            assert tokens.index(refused.token_after) == tokens.index(refused.token) + 1, (
                f"only the token just retired may be refused: {refused}"
            )
        # The switch happened for this client too: it ended on the last token, with 200s.
        assert prober.results[-1].token == tokens[-1]
        assert prober.results[-1].outcome == 200
    assert count(deployment) == 2
    per_kind = {
        kind: {
            "requests": sum(len(prober.results) for prober in pair),
            "dropped": sum(len(prober.dropped()) for prober in pair),
            "raced_a_rotation_401": sum(len(prober.refused()) for prober in pair),
        }
        for kind, pair in probers.items()
    }
    record(
        "token rotation (authToken)",
        rotations=ROTATIONS,
        apply_seconds_min=round(min(apply_seconds), 2),
        apply_seconds_max=round(max(apply_seconds), 2),
        requests_keep_alive=per_kind["keep-alive"]["requests"],
        dropped_keep_alive=per_kind["keep-alive"]["dropped"],
        raced_a_rotation_401_keep_alive=per_kind["keep-alive"]["raced_a_rotation_401"],
        requests_new_connection=per_kind["new connection"]["requests"],
        dropped_new_connection=per_kind["new connection"]["dropped"],
        raced_a_rotation_401_new_connection=per_kind["new connection"]["raced_a_rotation_401"],
        requests_per_second_per_client=round(reused.per_second()),
        caddy_reloads=deployment.reloads() - reloads,
        chroma_restarted=False,
        proxy_restarted=False,
    )


def test_auth_header_change_is_a_reload_too(deployment):
    chroma_pid, caddy_pid = deployment.pid("chroma"), deployment.pid("proxy")
    files = runtime_config.render_runtime_files(
        site=deployment.site,
        chroma_version=deployment.version,
        auth_header=runtime.X_CHROMA_TOKEN,
        token=deployment.token,
        otel=deployment.otel,
        acme_email=ACME_EMAIL,
    )
    reloads, caddy_loads = deployment.reloads(), deployment.caddy_loads()
    result = deployment.apply(runtime_config.run_command_for(files, deployment.version))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "proxy config reloaded in place" in result.stdout
    assert "token replaced" not in result.stdout, "the token did not change"
    assert deployment.reloads() == reloads + 1
    assert deployment.caddy_loads() > caddy_loads, "the reload reached Caddy (the rotation test relies on seeing it)"
    trusted = ssl.create_default_context(cafile=str(deployment.local_ca))
    with httpx.Client(base_url=deployment.base_url, verify=trusted) as client:
        response = client.get(deployment.count_path(), headers={runtime.X_CHROMA_TOKEN: deployment.token})
        assert response.status_code == 200
    back = deployment.apply(deployment.command())
    assert back.returncode == 0, back.stdout + back.stderr
    assert (deployment.pid("chroma"), deployment.pid("proxy")) == (chroma_pid, caddy_pid)


def test_otel_change_restarts_only_chroma_and_its_spans_arrive(deployment):
    caddy_pid, chroma_pid = deployment.pid("proxy"), deployment.pid("chroma")
    with otlp_sink() as sink:
        otel = OtelSettings(sink.endpoint, "chroma-day2")
        with Prober(deployment, deployment.token) as prober:
            started = time.monotonic()
            result = deployment.apply(deployment.command(otel=otel))
            seconds = time.monotonic() - started
            assert result.returncode == 0, result.stdout + result.stderr
        deployment.otel = otel
        assert "recreating" in result.stdout
        assert "proxy config reloaded" not in result.stdout
        assert deployment.pid("proxy") == caddy_pid, "the proxy keeps running"
        assert deployment.pid("chroma") != chroma_pid, "Chroma restarted with the new environment"
        assert count(deployment) == 2, "the data is still there"
        sink.wait_for_spans()
        assert any("chroma-day2" in export.service_names() for export in sink.exports)
    assert prober.results[-1].outcome == 200
    assert {r.outcome for r in prober.failed()} <= {502}, "while Chroma restarts the proxy answers 502"
    assert prober.down_seconds() < HEALTHY_WITHIN_SECONDS
    record_restart("OTel change (otelEndpoint)", seconds, prober)
    # Back to no tracing, so the collector stopping does not matter to the next tests.
    off = deployment.apply(deployment.command(otel=None))
    assert off.returncode == 0, off.stdout + off.stderr
    deployment.otel = None


def test_version_change_pulls_then_replaces_chroma_and_reports_it(deployment):
    caddy_pid = deployment.pid("proxy")
    with Prober(deployment, deployment.token) as prober:
        started = time.monotonic()
        result = deployment.apply(deployment.command(version=UPGRADE_VERSION))
        seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
    deployment.version = UPGRADE_VERSION
    output = result.stdout
    assert output.index(f"pulling {runtime.chroma_image(UPGRADE_VERSION)} ") < output.index("recreating")
    assert f"running {runtime.chroma_image(UPGRADE_VERSION)}" in output
    assert deployment.pid("proxy") == caddy_pid
    assert count(deployment) == 2
    record_restart("version change (chromaVersion)", seconds, prober)


def test_a_version_that_cannot_be_pulled_changes_nothing(deployment):
    chroma_pid = deployment.pid("chroma")
    compose_before = (deployment.config_dir / "compose.yaml").read_text()
    result = deployment.apply(deployment.command(version="9.9.9"))
    assert result.returncode == 1
    assert "could not pull chromadb/chroma:9.9.9; nothing was changed" in result.stdout
    assert f"{runtime.chroma_image(deployment.version)} still runs" in result.stdout
    assert deployment.pid("chroma") == chroma_pid
    assert (deployment.config_dir / "compose.yaml").read_text() == compose_before


def test_a_chroma_that_never_gets_healthy_is_rolled_back(deployment):
    """A real failure: an empty OTel endpoint makes chroma run panic at start (chroma #4609)."""
    chroma_pid = deployment.pid("chroma")
    good = deployment.command()
    document = yaml.safe_load(base64.b64decode(good.protected_parameters[runtime_config.COMPOSE_PARAMETER]))
    document["services"]["chroma"]["environment"] = {
        **(document["services"]["chroma"].get("environment") or {}),
        "CHROMA_OPEN_TELEMETRY__ENDPOINT": "",
    }
    compose = yaml.safe_dump(document, sort_keys=False)
    broken = runtime_config.RunCommand(
        script=good.script,
        parameters=good.parameters,
        protected_parameters={
            **good.protected_parameters,
            runtime_config.COMPOSE_PARAMETER: base64.b64encode(compose.encode()).decode(),
        },
    )
    started = time.monotonic()
    result = deployment.apply(broken)
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert "rolling back to the previous compose file" in result.stdout
    assert f"rolled back, {runtime.chroma_image(deployment.version)} runs" in result.stdout
    assert deployment.pid("chroma") != chroma_pid
    assert count(deployment) == 2, "the previous Chroma serves the data again"
    assert (deployment.config_dir / "compose.yaml").read_text() == (
        base64.b64decode(good.protected_parameters[runtime_config.COMPOSE_PARAMETER]).decode()
    )
    record("failed change, rolled back", apply_seconds=round(seconds, 2))


def test_a_proxy_config_caddy_refuses_leaves_the_running_one_and_the_token_in_force(deployment):
    """The proxy config goes first: when Caddy refuses it, the token that came with it is not applied either."""
    good = deployment.command(token=OLD_TOKEN if deployment.token != OLD_TOKEN else NEW_TOKEN)
    caddyfile_before = (deployment.config_dir / "proxy" / "Caddyfile").read_text()
    token_file_before = deployment.token_file.read_text()
    broken = runtime_config.RunCommand(
        script=good.script,
        parameters={
            **good.parameters,
            runtime_config.CADDYFILE_PARAMETER: base64.b64encode(b"{\n\tno_such_global_option\n}\n").decode(),
        },
        protected_parameters=good.protected_parameters,
    )
    result = deployment.apply(broken)
    assert result.returncode == 1
    assert "Caddy refused the new proxy config; the previous one stays in force" in result.stdout
    assert "token replaced" not in result.stdout
    assert (deployment.config_dir / "proxy" / "Caddyfile").read_text() == caddyfile_before
    assert deployment.token_file.read_text() == token_file_before
    assert count(deployment) == 2, "the running proxy still checks the current token"


def test_the_same_input_again_touches_nothing(deployment):
    pids = (deployment.pid("chroma"), deployment.pid("proxy"))
    result = deployment.apply(deployment.command())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "runtime config unchanged; nothing to do" in result.stdout
    assert (deployment.pid("chroma"), deployment.pid("proxy")) == pids


def test_heartbeat_is_open_through_the_reloaded_proxy(deployment):
    trusted = ssl.create_default_context(cafile=str(deployment.local_ca))
    with httpx.Client(base_url=deployment.base_url, verify=trusted) as client:
        assert client.get(HEARTBEAT_PATH).status_code == 200


def bootstrap_apply_script(tmp_path: Path) -> Path:
    script = tmp_path / "chroma-apply"
    script.write_text(cloud_config.write_files(cloud_config.render_cloud_config())[cloud_config.APPLY_SCRIPT])
    script.chmod(0o755)
    return script


@pytest.mark.parametrize(
    "parameter",
    [
        runtime_config.IMAGE_PARAMETER,
        runtime_config.CADDYFILE_PARAMETER,
        runtime_config.TOKEN_PARAMETER,
        runtime_config.COMPOSE_PARAMETER,
    ],
)
def test_a_missing_parameter_is_named_and_nothing_runs(tmp_path, parameter):
    command = runtime_config.run_command_for(
        runtime_config.RuntimeFiles(caddyfile="x", compose="y", token=OLD_TOKEN), pinned_chroma_version()
    )
    env = {**command.environment(), parameter: "", "PATH": "/usr/bin:/bin"}
    env["CHROMA_CONFIG_DIR"] = str(tmp_path / "etc")
    result = subprocess.run([bootstrap_apply_script(tmp_path)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert f"{parameter} is empty" in result.stdout
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("token", ["two words", "line\nbreak", 'a"quote', "trailing=garbage"])
def test_a_token_the_proxy_cannot_compare_is_refused_unseen_and_nothing_runs(tmp_path, token):
    command = runtime_config.run_command_for(
        runtime_config.RuntimeFiles(caddyfile="x", compose="y", token=OLD_TOKEN), pinned_chroma_version()
    )
    env = {**command.environment(), runtime_config.TOKEN_PARAMETER: token, "PATH": "/usr/bin:/bin"}
    env["CHROMA_CONFIG_DIR"] = str(tmp_path / "etc")
    result = subprocess.run([bootstrap_apply_script(tmp_path)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "CHROMA_AUTH_TOKEN is not RFC 6750 token68" in result.stdout
    assert token not in result.stdout + result.stderr
    assert not (tmp_path / "etc").exists()


def test_it_waits_for_cloud_init_and_gives_up_after_the_bound(tmp_path):
    command = runtime_config.run_command_for(
        runtime_config.RuntimeFiles(caddyfile="x", compose="y", token=OLD_TOKEN), pinned_chroma_version()
    )
    env = {
        **command.environment(),
        "PATH": "/usr/bin:/bin",
        "CHROMA_CONFIG_DIR": str(tmp_path / "etc"),
        "CHROMA_BOOT_FINISHED": str(tmp_path / "boot-finished"),
        "CHROMA_BOOT_WAIT_SECONDS": "0",
    }
    result = subprocess.run([bootstrap_apply_script(tmp_path)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "cloud-init has not finished within 0s" in result.stdout
    assert not (tmp_path / "etc").exists(), "nothing is written before the bootstrap is done"


def test_the_guest_script_hands_the_script_every_parameter_byte_for_byte(tmp_path):
    """What the VM tier feeds to `sh -s` in a guest: the same environment Azure's agent gives."""
    files = runtime_config.RuntimeFiles(
        caddyfile="a 'quoted' $HOME `x`\n\ttab\n", compose='b: "$$x"\n', token="A-Token_0.9~+/=="
    )
    command = runtime_config.run_command_for(files, pinned_chroma_version())
    dump = tmp_path / "dump-environment"
    dump.write_text(f"#!{sys.executable}\nimport json, os\nprint(json.dumps(dict(os.environ)))\n")
    dump.chmod(0o755)
    script = runtime_config.as_guest_script(command).replace(cloud_config.APPLY_SCRIPT, str(dump))
    result = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True, check=True, env={})
    seen = json.loads(result.stdout)
    assert {name: seen[name] for name in command.environment()} == command.environment()
    assert base64.b64decode(seen[runtime_config.CADDYFILE_PARAMETER]).decode() == files.caddyfile
    assert seen[runtime_config.TOKEN_PARAMETER] == files.token
