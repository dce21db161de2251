"""Day-2 changes on a running deployment: the VM's own chroma-apply, run unchanged, measured.

The apply script is taken from the rendered cloud-config (exactly the bytes the VM gets) and run
with the environment the run command gives it. It drives real programs: `chroma run` from the
pinned chromadb wheel and a real Caddy with the VM's proxy template on loopback (Caddy's internal
CA instead of ACME), through tests/day2_host.py, which plays `docker` and `systemctl` (see its
docstring for what that stand-in does not show). While each change is applied, clients send
authenticated requests through the proxy without pause, and the test counts what failed.

The measurements go to build/day2-report.json; README's "Change a running deployment" quotes them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import ssl
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
from live import CHROMA, caddy_binary, free_port, loopback_tls_site, otlp_sink, port_open, tls_handshake, wait_until
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
    def base_url(self) -> str:
        return f"https://{self.site.site_address}:{self.site.https_port}"

    @property
    def local_ca(self) -> Path:
        return self.root / "caddy" / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"

    def pid(self, service: str) -> int:
        return json.loads((self.root / "state.json").read_text())["services"][service]["pid"]

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

    def client(self, token: str, keep_alive: bool = True) -> httpx.Client:
        """An httpx client, as chromadb's HttpClient uses, trusting only Caddy's CA.

        With keep_alive (httpx's default, and chromadb's) it reuses its connection; without, every
        request opens a new one.
        """
        trusted = ssl.create_default_context(cafile=str(self.local_ca))
        headers = {AUTHORIZATION: auth_value(AUTHORIZATION, token)}
        limits = httpx.Limits() if keep_alive else httpx.Limits(max_keepalive_connections=0)
        return httpx.Client(base_url=self.base_url, verify=trusted, headers=headers, timeout=10, limits=limits)

    def count_path(self) -> str:
        return f"/api/v2/tenants/default_tenant/databases/default_database/collections/{self.collection_id}/count"


@dataclass
class Result:
    """One request: when it started and ended, and its status (or the error's name)."""

    start: float
    end: float
    outcome: int | str


class Prober(threading.Thread):
    """Sends the collection's count request without pause until stopped; keeps every result."""

    def __init__(self, deployment: Deployment, token: str, keep_alive: bool = True) -> None:
        super().__init__(daemon=True)
        self.deployment = deployment
        self.token = token
        self.keep_alive = keep_alive
        self.results: list[Result] = []
        self.halt = threading.Event()

    def run(self) -> None:
        with self.deployment.client(self.token, self.keep_alive) as client:
            while not self.halt.is_set():
                start = time.monotonic()
                try:
                    outcome: int | str = client.get(self.deployment.count_path()).status_code
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                self.results.append(Result(start, time.monotonic(), outcome))
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

    def down_seconds(self) -> float:
        """From the last answer before the first failure to the first answer after the last one."""
        failures = [index for index, r in enumerate(self.results) if r.outcome != 200]
        if not failures:
            return 0.0
        before = self.results[failures[0] - 1].end if failures[0] > 0 else self.results[0].start
        after = self.results[failures[-1] + 1].end if failures[-1] + 1 < len(self.results) else self.results[-1].end
        return after - before


def record(change: str, **numbers) -> None:
    measurements[change] = numbers


def compose_images() -> list[str]:
    compose = yaml.safe_load(cloud_config.render_compose(pinned_chroma_version(), None))
    return [service["image"] for service in compose["services"].values()]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A first apply on a fresh stand-in VM: chroma-apply starts chroma.service, with data in it."""
    root = tmp_path_factory.mktemp("day2")
    chroma_port = free_port()
    site = dataclasses.replace(
        loopback_tls_site(f"127.0.0.1:{chroma_port}"), admin_socket=str(root / "caddy-admin.sock")
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
    assert command.parameters == {"CHROMA_IMAGE": "chromadb/chroma:1.5.9"}
    assert OLD_TOKEN not in json.dumps(command.parameters)
    guest = runtime_config.as_guest_script(command)
    assert guest.rstrip().endswith(f"exec {cloud_config.APPLY_SCRIPT}")
    assert guest.count("export ") == 3


# What a client sees when Caddy's reload closes its connection under it: httpx's "Server
# disconnected without sending a response" and kin. Measured here: about one request in four
# reloads under load, on new and on reused connections alike (see README); never a 5xx or a
# wrong answer.
RELOAD_CLOSED_CONNECTION = {"RemoteProtocolError", "ReadError", "ConnectError"}


def test_token_rotation_is_a_reload_that_restarts_nothing(deployment):
    chroma_pid, caddy_pid = deployment.pid("chroma"), deployment.pid("proxy")
    with (
        Prober(deployment, OLD_TOKEN) as old,
        Prober(deployment, NEW_TOKEN) as new,
        Prober(deployment, OLD_TOKEN, keep_alive=False) as old_fresh,
        Prober(deployment, NEW_TOKEN, keep_alive=False) as new_fresh,
    ):
        started = time.monotonic()
        result = deployment.apply(deployment.command(token=NEW_TOKEN))
        finished = time.monotonic()
        assert result.returncode == 0, result.stdout + result.stderr
    deployment.token = NEW_TOKEN
    assert "proxy config reloaded in place" in result.stdout
    assert "recreating" not in result.stdout, "a token change must not touch Chroma"
    assert NEW_TOKEN not in result.stdout + result.stderr
    assert OLD_TOKEN not in result.stdout + result.stderr
    assert (deployment.pid("chroma"), deployment.pid("proxy")) == (chroma_pid, caddy_pid), "nothing restarted"
    # Every request got an answer, 200 or 401, except a request or two per client whose connection the
    # reload closed under it, during the reload: never a 5xx, never an answer from a stopped Chroma.
    for prober in (old, new, old_fresh, new_fresh):
        assert {r.outcome for r in prober.dropped()} <= RELOAD_CLOSED_CONNECTION, prober.dropped()
        assert len(prober.dropped()) <= 2, prober.dropped()
        assert all(started <= r.start <= finished for r in prober.dropped()), "only while reloading"
    # The switch is clean: the old token works until the reload and never after, the new one the reverse.
    for before, after in ((old, new), (old_fresh, new_fresh)):
        old_outcomes = [r.outcome for r in before.results if r.outcome not in RELOAD_CLOSED_CONNECTION]
        new_outcomes = [r.outcome for r in after.results if r.outcome not in RELOAD_CLOSED_CONNECTION]
        assert old_outcomes[0] == 200
        assert old_outcomes[-1] == 401
        assert new_outcomes[0] == 401
        assert new_outcomes[-1] == 200
        assert 401 not in old_outcomes[: old_outcomes.index(401)]
        assert 200 not in old_outcomes[old_outcomes.index(401) :]
    assert count(deployment) == 2
    record(
        "token rotation (authToken)",
        apply_seconds=round(finished - started, 2),
        requests_new_connection=len(old_fresh.results) + len(new_fresh.results),
        dropped_new_connection=len(old_fresh.dropped()) + len(new_fresh.dropped()),
        requests_keep_alive=len(old.results) + len(new.results),
        dropped_keep_alive=len(old.dropped()) + len(new.dropped()),
        requests_per_second_per_client=round(old.per_second()),
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
    result = deployment.apply(runtime_config.run_command_for(files, deployment.version))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "proxy config reloaded in place" in result.stdout
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
    down = prober.down_seconds()
    assert down < HEALTHY_WITHIN_SECONDS
    record(
        "OTel change (otelEndpoint)",
        apply_seconds=round(seconds, 2),
        requests=len(prober.results),
        requests_per_second=round(prober.per_second()),
        failed=len(prober.failed()),
        chroma_down_seconds=round(down, 2),
        proxy_restarted=False,
    )
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
    record(
        "version change (chromaVersion)",
        apply_seconds=round(seconds, 2),
        requests=len(prober.results),
        requests_per_second=round(prober.per_second()),
        failed=len(prober.failed()),
        chroma_down_seconds=round(prober.down_seconds(), 2),
        proxy_restarted=False,
    )


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


def test_a_proxy_config_caddy_refuses_leaves_the_running_one_in_force(deployment):
    good = deployment.command()
    caddyfile_before = (deployment.config_dir / "proxy" / "Caddyfile").read_text()
    broken = runtime_config.RunCommand(
        script=good.script,
        parameters=good.parameters,
        protected_parameters={
            **good.protected_parameters,
            runtime_config.CADDYFILE_PARAMETER: base64.b64encode(b"{\n\tno_such_global_option\n}\n").decode(),
        },
    )
    result = deployment.apply(broken)
    assert result.returncode == 1
    assert "Caddy refused the new proxy config; the previous one stays in force" in result.stdout
    assert (deployment.config_dir / "proxy" / "Caddyfile").read_text() == caddyfile_before
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


def test_a_missing_parameter_is_named_and_nothing_runs(tmp_path):
    command = runtime_config.run_command_for(
        runtime_config.RuntimeFiles(caddyfile="x", compose="y"), pinned_chroma_version()
    )
    env = {**command.environment(), runtime_config.CADDYFILE_PARAMETER: "", "PATH": "/usr/bin:/bin"}
    env["CHROMA_CONFIG_DIR"] = str(tmp_path / "etc")
    result = subprocess.run([bootstrap_apply_script(tmp_path)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "CHROMA_CADDYFILE_B64 is empty" in result.stdout
    assert not (tmp_path / "etc").exists()


def test_it_waits_for_cloud_init_and_gives_up_after_the_bound(tmp_path):
    command = runtime_config.run_command_for(
        runtime_config.RuntimeFiles(caddyfile="x", compose="y"), pinned_chroma_version()
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
    files = runtime_config.RuntimeFiles(caddyfile="a 'quoted' $HOME `x`\n\ttab\n", compose='b: "$$x"\n')
    command = runtime_config.run_command_for(files, pinned_chroma_version())
    dump = tmp_path / "dump-environment"
    dump.write_text(f"#!{sys.executable}\nimport json, os\nprint(json.dumps(dict(os.environ)))\n")
    dump.chmod(0o755)
    script = runtime_config.as_guest_script(command).replace(cloud_config.APPLY_SCRIPT, str(dump))
    result = subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True, check=True, env={})
    seen = json.loads(result.stdout)
    assert {name: seen[name] for name in command.environment()} == command.environment()
    assert base64.b64decode(seen[runtime_config.CADDYFILE_PARAMETER]).decode() == files.caddyfile
