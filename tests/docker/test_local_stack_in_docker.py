"""The local stack run for real: what __main__.py registers, created in a Docker engine by the provider double.

The stack runs on the stand-in images under the pinned names (tests/images.py). Tests reach the
containers only through the port published on 127.0.0.1; what another container on the stack's
network can reach is probed from inside such a container.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import chromadb
import pytest
import yaml
from conftest import ProgramRun, run_program
from docker_provider import apply, destroy
from images import caddy_image_name, chroma_image_name
from live import free_port, port_open, wait_until, write_token_file

from components import cloud_config, runtime
from components.local_docker import HEALTHY_WITHIN_SECONDS, LOCAL_SITE, PROXY_CONTAINER_PORT
from scripts import smoke_test

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "build" / "docker-report.json"
PHASES = ("images", "apply_to_healthy", "smoke_test", "recreate_to_healthy")
COLLECTION = "survives"
IDS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def docker_report(docker_engine, standin_images):
    """Seconds per phase, written to build/docker-report.json when the tier ends (README shows them)."""
    report = {
        "engine": {"version": docker_engine.version, "started_here": docker_engine.started_here},
        "phases": {"images": round(standin_images.seconds, 1)},
        "containers_seconds_to_healthy": {},
    }
    yield report
    report["complete"] = all(phase in report["phases"] for phase in PHASES)
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


class Stack:
    """One deployment of the local stack in the engine, under a unique stack name and a free port."""

    def __init__(self, engine, overrides: dict[str, str] | None = None) -> None:
        self.engine = engine
        self.stack_name = f"dt{uuid.uuid4().hex[:8]}"
        self.host_port = free_port()
        self.overrides = {"hostPort": str(self.host_port), **(overrides or {})}
        self.run: ProgramRun = run_program("local", self.overrides, stack_name=self.stack_name)

    @property
    def prefix(self) -> str:
        return f"chroma-infra-{self.stack_name}"

    @property
    def chroma(self) -> str:
        return f"{self.prefix}-chroma"

    @property
    def proxy(self) -> str:
        return f"{self.prefix}-proxy"

    @property
    def guard(self) -> str:
        return f"{self.prefix}-guard"

    @property
    def volume(self) -> str:
        return f"{self.prefix}-data"

    def apply(self) -> float:
        """Creates the stack; returns the seconds until both containers were healthy."""
        started = time.monotonic()
        self.applied = apply(self.engine.host, self.run)
        return time.monotonic() - started

    def reconfigure(self, overrides: dict[str, str]) -> None:
        """Runs the program again with more config, as the next `pulumi up` would."""
        self.overrides |= overrides
        self.run = run_program("local", self.overrides, stack_name=self.stack_name)

    def destroy(self) -> None:
        destroy(self.engine.host, self.run)

    def client(self) -> chromadb.HttpClient:
        header = self.run.outputs["authHeader"]
        return chromadb.HttpClient(
            host="127.0.0.1",
            port=self.host_port,
            headers={header: runtime.auth_value(header, self.run.outputs["authToken"])},
        )

    def health(self, container: str) -> str:
        return self.engine.inspect(container)[0]["State"].get("Health", {}).get("Status", "none")

    def wait_healthy(self) -> None:
        for container in (self.proxy, self.chroma):
            wait_until(lambda c=container: self.health(c) == "healthy", HEALTHY_WITHIN_SECONDS, f"{container} healthy")

    def probe(self, url: str) -> int:
        """The exit code of a GET of `url` from a second container on the stack's network (0: it answered)."""
        process = self.engine.run(
            "run",
            "--rm",
            "--network",
            self.prefix,
            "--log-driver",
            "none",
            caddy_image_name(),
            # Debian's busybox wget crashes with its own -T; coreutils timeout bounds it instead.
            "timeout",
            "10",
            "wget",
            "-q",
            "-O",
            "/dev/null",
            url,
            check=False,
            timeout=60,
        )
        return process.returncode

    def remove_everything(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.destroy()
        self.engine.run("volume", "rm", "-f", self.volume, check=False)


def smoke(stack: Stack, capsys) -> tuple[int, dict, float]:
    started = time.monotonic()
    code = smoke_test.main(
        [
            "--endpoint",
            stack.run.outputs["endpoint"],
            "--token",
            stack.run.outputs["authToken"],
            "--auth-header",
            stack.run.outputs["authHeader"],
            "--json",
            "--wait",
            "30",
        ]
    )
    return code, json.loads(capsys.readouterr().out), time.monotonic() - started


@pytest.fixture(scope="module")
def stack(docker_engine, standin_images, docker_report):
    deployed = Stack(docker_engine)
    try:
        docker_report["phases"]["apply_to_healthy"] = round(deployed.apply(), 1)
        docker_report["capabilities_this_machine_cannot_grant"] = deployed.applied.capabilities_not_granted
        docker_report["containers_seconds_to_healthy"] = {
            name: round(seconds, 1) for name, seconds in deployed.applied.seconds_to_healthy.items()
        }
        collection = deployed.client().create_collection(COLLECTION)
        collection.add(ids=IDS, embeddings=[[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], documents=["x", "y", "z"])
        yield deployed
    finally:
        deployed.remove_everything()


def assert_data_kept(stack: Stack) -> None:
    stored = stack.client().get_collection(COLLECTION).get(ids=IDS)
    assert sorted(stored["ids"]) == IDS
    assert sorted(stored["documents"]) == ["x", "y", "z"]


def test_both_containers_are_healthy_within_the_programs_timeout(stack):
    assert set(stack.applied.seconds_to_healthy) == {"chroma-chroma", "chroma-proxy"}
    for name, seconds in stack.applied.seconds_to_healthy.items():
        assert seconds < HEALTHY_WITHIN_SECONDS, name
    assert stack.health(stack.chroma) == "healthy"
    assert stack.health(stack.proxy) == "healthy"


def test_smoke_test_passes_every_check_with_the_bearer_header(stack, capsys, docker_report):
    code, report, seconds = smoke(stack, capsys)
    docker_report["phases"]["smoke_test"] = round(seconds, 1)
    assert code == 0, report
    assert [check["name"] for check in report["checks"]] == list(smoke_test.CHECKS)
    assert all(check["ok"] for check in report["checks"]), report


def test_head_of_the_heartbeat_answers_without_a_token_and_nothing_else_does(stack):
    def status(method: str, path: str) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", stack.host_port, timeout=10)
        try:
            connection.request(method, path)
            return connection.getresponse().status
        finally:
            connection.close()

    # Uptime monitors that use HEAD saw 401 here and reported the service down.
    assert status("HEAD", runtime.HEARTBEAT_PATH) == 200
    assert status("GET", runtime.HEARTBEAT_PATH) == 200
    assert status("HEAD", "/api/v2/collections") == 401
    assert status("POST", runtime.HEARTBEAT_PATH) == 401


def test_only_the_proxy_is_published_and_only_on_loopback(stack):
    chroma, proxy = stack.engine.inspect(stack.chroma, stack.proxy)
    assert not chroma["HostConfig"].get("PortBindings"), "Chroma must have no host port"
    assert chroma["HostConfig"]["NetworkMode"] == f"container:{proxy['Id']}"
    assert proxy["HostConfig"]["PortBindings"] == {
        f"{PROXY_CONTAINER_PORT}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(stack.host_port)}]
    }


def test_another_container_on_the_network_reaches_the_proxy(stack):
    # The control for the two tests below: the probe does reach the proxy's public site.
    assert stack.probe(f"http://{stack.proxy}:{PROXY_CONTAINER_PORT}{runtime.HEARTBEAT_PATH}") == 0


def test_another_container_on_the_network_cannot_reach_chroma(stack):
    for host in (stack.chroma, stack.proxy):
        assert stack.probe(f"http://{host}:{runtime.CHROMA_PORT}{runtime.HEARTBEAT_PATH}") != 0, (
            f"Chroma answered a second container at {host}:{runtime.CHROMA_PORT}, without the proxy's token check"
        )


def test_another_container_on_the_network_cannot_reach_the_health_site(stack):
    assert stack.probe(f"http://{stack.proxy}:{runtime.PROXY_HEALTH_PORT}/healthz") != 0, (
        "the proxy's health site answered another container"
    )


def test_the_token_file_is_root_only_and_the_caddyfile_holds_no_token(stack):
    owner_and_mode = stack.engine.run("exec", stack.proxy, "stat", "-c", "%u:%g %a", runtime.PROXY_TOKEN_FILE)
    assert owner_and_mode.stdout.strip() == "0:0 600"
    caddyfile = stack.engine.run("exec", stack.proxy, "cat", "/etc/caddy/Caddyfile").stdout
    assert stack.run.outputs["authToken"] not in caddyfile
    assert f"{{file.{runtime.PROXY_TOKEN_FILE}}}" in caddyfile


def status_of(port: int, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/api/v2/version", headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_vms_directory_mount_shows_caddy_a_token_file_replaced_on_the_host(docker_engine, standin_images, tmp_path):
    """The VM's proxy mounts /etc/chroma/proxy read-only, as a directory; chroma-apply renames a new token file in.

    Here the stand-in Caddy image runs with the VM's mount of a host folder, and the token file is
    replaced on the host the way chroma-apply's replace_file does it (a new root-only file, then a
    rename). Its upstream is closed: a request that passes the token check gets 502, one that
    fails it 401.
    """
    folder = tmp_path / "proxy"
    old, new = "MountOldToken0123456789abcdefghij", "MountNewToken9876543210zyxwvutsrq"
    write_token_file(folder / "token", old)
    # Nothing listens on the site's upstream (Chroma's port) in this container.
    (folder / "Caddyfile").write_text(runtime.render_caddyfile(LOCAL_SITE, runtime.AUTHORIZATION))
    volumes = yaml.safe_load(cloud_config.render_compose("1.5.9", None))["services"]["proxy"]["volumes"]
    (mount,) = [volume for volume in volumes if volume["source"] == cloud_config.PROXY_CONFIG_DIR]
    assert (mount["target"], mount["read_only"]) == ("/etc/caddy", True), "as the VM's compose file mounts it"
    name, port = f"chroma-infra-mount-{uuid.uuid4().hex[:8]}", free_port()
    # A network of its own: a private engine here has no default bridge.
    docker_engine.run("network", "create", name)
    docker_engine.run(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        name,
        "--publish",
        f"127.0.0.1:{port}:{PROXY_CONTAINER_PORT}",
        "--mount",
        f"type=bind,source={folder},target={mount['target']},readonly",
        caddy_image_name(),
    )
    try:
        wait_until(lambda: port_open(port) and status_of(port, {}) == 401, 30, "Caddy in the container")
        started = docker_engine.inspect(name)[0]["State"]["StartedAt"]
        bearer = {token: {"Authorization": runtime.auth_value(runtime.AUTHORIZATION, token)} for token in (old, new)}
        assert (status_of(port, bearer[old]), status_of(port, bearer[new])) == (502, 401)
        write_token_file(folder / "token.new", new)
        os.replace(folder / "token.new", folder / "token")
        assert (status_of(port, bearer[new]), status_of(port, bearer[old])) == (502, 401)
        assert docker_engine.inspect(name)[0]["State"]["StartedAt"] == started, "no restart"
    finally:
        docker_engine.run("rm", "--force", name, check=False)
        docker_engine.run("network", "rm", name, check=False)


def test_logs_are_bounded_on_every_container(stack):
    for container in stack.engine.inspect(stack.chroma, stack.proxy, stack.guard):
        assert container["HostConfig"]["LogConfig"] == {
            "Type": "json-file",
            "Config": {"max-size": runtime.LOG_MAX_SIZE, "max-file": str(runtime.LOG_MAX_FILES)},
        }, container["Name"]


def guard_says(stack, text: str) -> int:
    """How many lines of the guard's log, over all its starts, contain `text`."""
    result = stack.engine.run("logs", stack.guard)
    return sum(text in line for line in (result.stdout + result.stderr).splitlines())


CLEAN_START = "last stop was clean; indexes kept"
UNCLEAN_START = "no clean-shutdown marker"


def test_data_survives_a_docker_restart(stack):
    clean, unclean = guard_says(stack, CLEAN_START), guard_says(stack, UNCLEAN_START)
    # The proxy owns the network namespace, so it comes back first and the guard and Chroma re-join it.
    stack.engine.run("restart", stack.proxy, stack.guard, stack.chroma, timeout=180)
    stack.wait_healthy()
    assert_data_kept(stack)
    assert guard_says(stack, CLEAN_START) == clean + 1, "a restart stops Chroma cleanly: no repair"
    assert guard_says(stack, UNCLEAN_START) == unclean


def chroma_server_pid(init_pid: int) -> int:
    """The `chroma run` process under the container's init (dumb-init, then chroma-start.sh)."""
    pending = [init_pid]
    while pending:
        pid = pending.pop()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if any(part.endswith(b"chroma") for part in argv[:2]) and b"run" in argv:
            return pid
        pending += [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    raise AssertionError(f"no `chroma run` under PID {init_pid}")


def test_data_survives_a_killed_chroma_process(stack):
    unclean, moved = guard_says(stack, UNCLEAN_START), guard_says(stack, "before-start: moved aside")
    before = stack.engine.inspect(stack.chroma)[0]
    os.kill(chroma_server_pid(before["State"]["Pid"]), signal.SIGKILL)
    wait_until(
        lambda: stack.engine.inspect(stack.chroma)[0]["RestartCount"] > before["RestartCount"],
        30,
        "the restart policy bringing Chroma back",
    )
    stack.wait_healthy()
    assert_data_kept(stack)
    # The restart after the kill found no marker, so the guard moved the indexes aside and rebuilt them.
    assert guard_says(stack, UNCLEAN_START) == unclean + 1
    assert guard_says(stack, "before-start: moved aside") > moved
    log = stack.engine.run("logs", stack.guard)
    verdicts = re.findall(r"after-start: verify: (\d+) of (\d+) collections whole", log.stdout + log.stderr)
    assert verdicts, "the guard verified after the rebuild"
    assert verdicts[-1][0] == verdicts[-1][1], verdicts[-1]


def test_recreate_keeps_the_volume_and_the_other_header_mode_passes(stack, capsys, docker_report):
    stack.destroy()
    assert stack.engine.run("volume", "inspect", stack.volume, check=False).returncode == 0, "protected volume kept"
    stack.reconfigure({"authHeader": runtime.X_CHROMA_TOKEN})
    docker_report["phases"]["recreate_to_healthy"] = round(stack.apply(), 1)
    assert_data_kept(stack)
    code, report, _ = smoke(stack, capsys)
    assert code == 0, report
    assert all(check["ok"] for check in report["checks"]), report


def test_destroy_without_protection_removes_the_volume(docker_engine, standin_images):
    throwaway = Stack(docker_engine, {"protectDataDisk": "false"})
    try:
        throwaway.apply()
        assert docker_engine.run("volume", "inspect", throwaway.volume, check=False).returncode == 0
        throwaway.destroy()
        assert docker_engine.run("volume", "inspect", throwaway.volume, check=False).returncode != 0
        assert docker_engine.run("container", "inspect", throwaway.chroma, check=False).returncode != 0
    finally:
        throwaway.remove_everything()


def test_stand_ins_are_laid_out_as_the_real_images(docker_engine, standin_images):
    chroma, caddy = docker_engine.inspect(chroma_image_name(), caddy_image_name(), kind="image")
    assert chroma["Config"]["Entrypoint"] == ["dumb-init", "--", "chroma"]
    assert chroma["Config"]["Cmd"] == ["run", "/config.yaml"]
    assert set(chroma["Config"]["ExposedPorts"]) == {"8000/tcp"}
    assert caddy["Config"]["Cmd"] == ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
    assert {"XDG_CONFIG_HOME=/config", "XDG_DATA_HOME=/data"} <= set(caddy["Config"]["Env"])
    assert set(caddy["Config"]["Volumes"]) == {"/config", "/data"}
    inside = docker_engine.run(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "bash",
        chroma_image_name(),
        "-c",
        "cat /config.yaml; command -v curl || echo no-curl; chroma --help >/dev/null && echo chroma-runs",
    ).stdout
    assert inside.split("\n") == ['persist_path: "/data"', "no-curl", "chroma-runs", ""]
    version = docker_engine.run("run", "--rm", "--network", "none", caddy_image_name(), "caddy", "version").stdout
    assert version.startswith(f"v{caddy_image_name().split(':')[1]} ")
