"""A stand-in for the VM's `docker` and `systemctl`, so chroma-apply runs unchanged on this machine.

No image can be pulled here, so the containers are the programs the images run: a compose service
`chroma` is a real `chroma run` (the chromadb wheel, the pinned version) and `proxy` is a real
`caddy run`, started from the compose file chroma-apply installed, with its bind mounts mapped to
test folders and its environment passed as compose would. `caddy reload` inside the proxy is a
real `caddy reload` on the mounted Caddyfile, through the admin socket the Caddyfile names, and is
counted (state.json's "reloads"), so a test can tell a reload from a change that needed none. The
Caddyfile names the token file by its path in the test folder (a ProxySite parameter).

What it does not do, and so what these tests do not show: Docker's own start and stop time for a
container, health checks run by Docker (here: Chroma's heartbeat and the proxy's port), and
registry pulls (an image "pulls" only when the test lists it; every listed Chroma tag runs the same
installed chroma binary). Only the verbs chroma-apply uses are known; anything else fails loudly.
Each call is one process: state (PIDs, what each runs) lives in DAY2_HOST_STATE/state.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

STATE_VARIABLE = "DAY2_HOST_STATE"
HEARTBEAT = "/api/v2/heartbeat"
STOP_GRACE_SECONDS = 15
IMAGE_CONFIG = 'persist_path: "/data"\n'
CHROMA_CONTAINER_PORT = 8000


class Host:
    """The state folder: host.json (set by the test) and state.json (what runs)."""

    def __init__(self) -> None:
        self.root = Path(os.environ[STATE_VARIABLE])
        self.config: dict[str, Any] = json.loads((self.root / "host.json").read_text())
        state_file = self.root / "state.json"
        self.state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.state.setdefault("pulled", [])
        self.state.setdefault("services", {})
        self.state.setdefault("units", [])
        self.state.setdefault("reloads", 0)

    def save(self) -> None:
        (self.root / "state.json").write_text(json.dumps(self.state, indent=1))

    def host_path(self, vm_path: str) -> Path:
        """A path on the VM, mapped to the test folder that plays it (a path already in one stays)."""
        for prefix, local in self.config["paths"].items():
            if vm_path == prefix or vm_path.startswith(prefix + "/"):
                return Path(local + vm_path[len(prefix) :])
            if vm_path == local or vm_path.startswith(local + "/"):
                return Path(vm_path)
        raise SystemExit(f"day2_host: no test folder plays the VM path {vm_path}")

    def alive(self, service: str) -> bool:
        entry = self.state["services"].get(service)
        if not entry:
            return False
        try:
            os.kill(entry["pid"], 0)
        except ProcessLookupError:
            return False
        # A zombie or a process that exited: its status file says so.
        try:
            return "\nState:\tZ" not in Path(f"/proc/{entry['pid']}/status").read_text()
        except FileNotFoundError:
            return False


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(FileNotFoundError):
            if "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _spawn(command: list[str], env: dict[str, str], log: Path) -> int:
    with log.open("a") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return process.pid


def _mounts(host: Host, service: dict[str, Any]) -> dict[str, Path]:
    return {volume["target"]: host.host_path(volume["source"]) for volume in service.get("volumes", [])}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    # In the file, $$ is compose's escape for a literal $.
    return {key: str(value).replace("$$", "$") for key, value in (service.get("environment") or {}).items()}


def _pull(host: Host, image: str) -> bool:
    if image in host.state["pulled"]:
        return True
    if image not in host.config["registry"]:
        print(f"Error response from daemon: manifest for {image} not found: manifest unknown", file=sys.stderr)
        return False
    host.state["pulled"].append(image)
    return True


# How the real images start when the compose file does not say (entrypoint, then command).
IMAGE_DEFAULTS = {
    "chromadb/chroma": (["dumb-init", "--", "chroma"], ["run", "/config.yaml"]),
}


def _argv(host: Host, service: dict[str, Any], workdir: Path) -> list[str]:
    """The container's command as the test's own programs: mounts mapped, image paths replaced."""
    default_entrypoint, default_command = IMAGE_DEFAULTS.get(service["image"].split(":")[0], ([], []))
    entrypoint = service.get("entrypoint", default_entrypoint)
    command = service.get("command", default_command if "entrypoint" not in service else [])
    argv = [*entrypoint, *command]
    # dumb-init only forwards signals: the stand-in signals the whole process group instead.
    if argv[:2] == ["dumb-init", "--"]:
        argv = argv[2:]
    mounts = _mounts(host, service)
    programs = {
        "chroma": host.config["chroma"],
        "python3": sys.executable,
        "/config.yaml": str(workdir / "config.yaml"),
    }
    # Chroma by its service name, or on the loopback of a namespace it shares: its port here.
    chroma_urls = {f"http://{name}:{CHROMA_CONTAINER_PORT}" for name in ("chroma", "127.0.0.1", "localhost")}

    def mapped(argument: str) -> str:
        if argument in programs:
            return programs[argument]
        if argument in chroma_urls:
            return f"http://127.0.0.1:{host.config['chroma_port']}"
        for target, source in mounts.items():
            if argument == target or argument.startswith(target + "/"):
                return str(source) + argument[len(target) :]
        return argument

    return [mapped(argument) for argument in argv]


def _start_chroma(host: Host, service: dict[str, Any]) -> dict[str, Any]:
    workdir = host.root / "chroma"
    workdir.mkdir(exist_ok=True)
    (workdir / "config.yaml").write_text(IMAGE_CONFIG)
    data = str(_mounts(host, service)["/data"])
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CHROMA_", "OTEL_"))}
    env |= {
        "CHROMA_LISTEN_ADDRESS": "127.0.0.1",
        "ANONYMIZED_TELEMETRY": "False",
        **_environment(service),
        # The stand-in's mount and port mapping win over the service's own values, as Docker's would.
        "CHROMA_PERSIST_PATH": data,
        # Where a start script in the container finds /data (the image leaves it unset).
        "CHROMA_DATA_DIR": data,
        "CHROMA_PORT": str(host.config["chroma_port"]),
        # A start script's private first-start port: free on the container's own loopback, not here.
        "CHROMA_BOOTSTRAP_PORT": str(_free_port()),
    }
    pid = _spawn(_argv(host, service, workdir), env, workdir / "chroma.log")
    return {"pid": pid, "image": service["image"], "spec": _spec(service)}


def _start_helper(host: Host, service: dict[str, Any]) -> dict[str, Any]:
    """A service beside Chroma with its own command (such as a data guard), run as that command."""
    workdir = host.root / "helper"
    workdir.mkdir(exist_ok=True)
    env = {**os.environ, **_environment(service)}
    pid = _spawn(_argv(host, service, workdir), env, workdir / "helper.log")
    return {"pid": pid, "image": service["image"], "spec": _spec(service)}


def _caddy_env(host: Host) -> dict[str, str]:
    workdir = host.root / "caddy"
    workdir.mkdir(exist_ok=True)
    return {
        **os.environ,
        "HOME": str(workdir),
        "XDG_DATA_HOME": str(workdir / "data"),
        "XDG_CONFIG_HOME": str(workdir / "config"),
    }


def _start_proxy(host: Host, service: dict[str, Any]) -> dict[str, Any]:
    caddyfile = _mounts(host, service)["/etc/caddy"] / "Caddyfile"
    command = [host.config["caddy"], "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
    pid = _spawn(command, _caddy_env(host), host.root / "caddy" / "caddy.log")
    return {"pid": pid, "image": service["image"], "spec": _spec(service)}


def _spec(service: dict[str, Any]) -> str:
    # Compose recreates a container when its service definition changes; this is that definition.
    return json.dumps(service, sort_keys=True)


def _healthy(host: Host, name: str) -> bool:
    if name == "chroma":
        url = f"http://127.0.0.1:{host.config['chroma_port']}{HEARTBEAT}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
        return False
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", host.config["proxy_health_port"])) == 0


def compose_up(host: Host, compose_file: Path, wait_timeout: float) -> int:
    """`docker compose up --detach --wait`: recreate what changed, then wait for health."""
    services = yaml.safe_load(compose_file.read_text())["services"]
    starters = {"chroma": _start_chroma, "proxy": _start_proxy}
    for name, service in services.items():
        if name not in starters and "command" not in service:
            raise SystemExit(f"day2_host: no stand-in for the compose service {name}")
    # Helpers first: a start script in Chroma's container may wait for one of them.
    order = [name for name in services if name not in starters] + ["chroma", "proxy"]
    for name in order:
        service = services[name]
        running = host.state["services"].get(name)
        if host.alive(name) and running and running["spec"] == _spec(service):
            continue
        if not _pull(host, service["image"]):
            host.save()
            return 1
        if running:
            _stop(running["pid"])
        host.state["services"][name] = starters.get(name, _start_helper)(host, service)
        host.save()
    deadline = time.monotonic() + wait_timeout
    for name in ("chroma", "proxy"):
        while not _healthy(host, name):
            if not host.alive(name):
                print(f"container chroma-{name}-1 exited", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"container chroma-{name}-1 is unhealthy", file=sys.stderr)
                return 1
            time.sleep(0.1)
    return 0


def docker(arguments: list[str]) -> int:
    """The docker verbs chroma-apply uses."""
    host = Host()
    try:
        return _docker(host, arguments)
    finally:
        host.save()


def _docker(host: Host, arguments: list[str]) -> int:
    match arguments:
        case ["image", "inspect", image]:
            return 0 if image in host.state["pulled"] else 1
        case ["pull", "--quiet", image]:
            return 0 if _pull(host, image) else 1
        case ["inspect", "--format", "{{.Config.Image}}", container]:
            entry = host.state["services"].get("chroma")
            if not entry or container != f"chroma-{entry['pid']}":
                return 1
            print(entry["image"])
            return 0
        case ["compose", "--file", compose_file, *rest]:
            return _compose(host, Path(host.host_path(compose_file)), rest)
    raise SystemExit(f"day2_host: docker {' '.join(arguments)} is not a verb chroma-apply uses")


def _compose(host: Host, compose_file: Path, arguments: list[str]) -> int:
    match arguments:
        case ["ps", "--quiet", "chroma"]:
            if host.alive("chroma"):
                print(f"chroma-{host.state['services']['chroma']['pid']}")
            return 0
        case ["up", "--detach", "--wait", "--wait-timeout", seconds]:
            return compose_up(host, compose_file, float(seconds))
        case ["up", "--detach", "--wait"]:
            return compose_up(host, compose_file, 900)
        case ["exec", "-T", "proxy", "caddy", "reload", "--config", config, "--adapter", "caddyfile"]:
            if not host.alive("proxy"):
                print("service proxy is not running", file=sys.stderr)
                return 1
            proxy = yaml.safe_load(compose_file.read_text())["services"]["proxy"]
            mounted = _mounts(host, proxy)["/etc/caddy"] / Path(config).relative_to("/etc/caddy")
            command = [host.config["caddy"], "reload", "--config", str(mounted), "--adapter", "caddyfile"]
            host.state["reloads"] += 1
            return subprocess.run(command, env=_caddy_env(host), check=False).returncode
    raise SystemExit(f"day2_host: docker compose {' '.join(arguments)} is not a verb chroma-apply uses")


def systemctl(arguments: list[str]) -> int:
    """chroma.service as the VM's unit runs it: its ExecStart is `docker compose up --detach --wait`."""
    host = Host()
    try:
        match arguments:
            case ["is-active", "--quiet", "chroma.service"]:
                return 0 if "chroma.service" in host.state["units"] else 3
            case ["start", "chroma.service"]:
                compose_file = host.host_path("/etc/chroma/compose.yaml")
                status = compose_up(host, compose_file, 900)
                if status == 0:
                    host.state["units"].append("chroma.service")
                return status
        raise SystemExit(f"day2_host: systemctl {' '.join(arguments)} is not a verb chroma-apply uses")
    finally:
        host.save()


def stop_everything(state_dir: Path) -> None:
    """Stops whatever the stand-in started (for the test's teardown)."""
    state_file = state_dir / "state.json"
    if state_file.exists():
        for entry in json.loads(state_file.read_text()).get("services", {}).values():
            _stop(entry["pid"])


def install(bin_dir: Path) -> None:
    """Puts `docker` and `systemctl` executables that call this module into `bin_dir`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for verb in ("docker", "systemctl"):
        path = bin_dir / verb
        path.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            f"import day2_host\nsys.exit(day2_host.{verb}(sys.argv[1:]))\n"
        )
        path.chmod(0o755)
