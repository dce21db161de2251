"""A test double of the pulumi-docker provider: it creates in a real engine what a program registered.

No Pulumi CLI and no provider plugin run here, so `apply(engine, run)` takes the resources that the
real __main__.py registered under mocks (tests/conftest.py `run_program`) and creates them through
the Engine API, input by input, as pulumi-docker 5.x documents each one (and as its Terraform
provider, kreuzwerker/docker, sends it). An input it does not know fails the apply, so a new field
in the program cannot be dropped without a word. `destroy` removes them in reverse order, keeping
what `retainOnDelete` keeps.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import socket
import tarfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from conftest import ProgramRun, Registered, mock_image_id, mock_resource_id, plain

API_VERSION = "v1.41"
NETWORK = "docker:index/network:Network"
VOLUME = "docker:index/volume:Volume"
REMOTE_IMAGE = "docker:index/remoteImage:RemoteImage"
CONTAINER = "docker:index/container:Container"
# State keys the mocks echo back that are outputs, not inputs.
MOCK_OUTPUTS = {"imageId"}
# Every input the double maps, per resource type; anything else fails the apply.
KNOWN_INPUTS = {
    NETWORK: {"name"},
    VOLUME: {"name"},
    REMOTE_IMAGE: {"name", "keepLocally"},
    CONTAINER: {
        "name",
        "image",
        "envs",
        "volumes",
        "networksAdvanced",
        "networkMode",
        "ports",
        "uploads",
        "healthcheck",
        "restart",
        "wait",
        "waitTimeout",
        "logDriver",
        "logOpts",
        "stopSignal",
        "stopTimeout",
        "command",
        "entrypoints",
        "capabilities",
        "destroyGraceSeconds",
    },
}
KNOWN_NESTED = {
    "volumes": {"volumeName", "containerPath", "readOnly"},
    "networksAdvanced": {"name", "aliases"},
    "ports": {"internal", "external", "ip", "protocol"},
    "uploads": {"file", "content", "contentBase64", "executable", "permissions"},
    "healthcheck": {"tests", "interval", "timeout", "retries", "startPeriod", "startInterval"},
    "capabilities": {"adds", "drops"},
}
# pulumi-docker's documented defaults for inputs the program may leave out.
DEFAULT_WAIT_TIMEOUT_SECONDS = 60


class UnknownInputError(ValueError):
    """The program set an input this double does not map; map it here, as pulumi-docker documents it."""


class ApplyError(RuntimeError):
    """What `pulumi up` would have failed with."""


# Linux capability numbers (linux/capability.h) of the capabilities the program may add.
CAPABILITY_NUMBERS = {"SYS_RESOURCE": 24, "NET_BIND_SERVICE": 10, "SYS_NICE": 23, "IPC_LOCK": 14}


def capabilities_this_host_cannot_grant(names: list[str]) -> list[str]:
    """The capabilities missing from this process's bounding set: no container started from here can have them.

    Some machines run the tests inside a container that lacks CAP_SYS_RESOURCE; there the engine
    refuses a container that asks for it. The double then leaves it out and says so (Applied and
    the docker report), as a limit of the machine, not of the program.
    """
    bounding = int(Path("/proc/self/status").read_text().split("CapBnd:")[1].split()[0], 16)
    return [name for name in names if not bounding >> CAPABILITY_NUMBERS[name.removeprefix("CAP_")] & 1]


def _duration_ns(value: str) -> int:
    """A Go duration as the provider parses it ("10s", "500ms", "1m30s") in nanoseconds."""
    units = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    return int(sum(float(number) * units[unit] for number, unit in parts))


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


@dataclass
class EngineApi:
    """The Docker Engine API over the engine's unix socket (the provider talks to it the same way)."""

    host: str

    def call(
        self,
        method: str,
        endpoint: str,
        body: Any = None,
        raw: bytes | None = None,
        timeout: float = 120,
        **query: Any,
    ) -> Any:
        if not self.host.startswith("unix://"):
            raise ValueError(f"only unix:// engines are supported, not {self.host}")
        connection = _UnixConnection(self.host.removeprefix("unix://"), timeout)
        url = f"/{API_VERSION}{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {}
        payload = raw
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif raw is not None:
            headers["Content-Type"] = "application/x-tar"
        try:
            connection.request(method, url, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        if response.status >= 400:
            raise ApplyError(f"{method} {endpoint}: {response.status} {data.decode(errors='replace').strip()}")
        return (
            json.loads(data) if data and response.getheader("Content-Type", "").startswith("application/json") else data
        )


@dataclass
class Applied:
    """What the double created, by logical name, and how long the containers took to be healthy."""

    run: ProgramRun
    container_ids: dict[str, str] = field(default_factory=dict)
    # Capabilities a container asked for that this machine cannot grant (left out), by container.
    capabilities_not_granted: dict[str, list[str]] = field(default_factory=dict)
    container_names: dict[str, str] = field(default_factory=dict)
    seconds_to_healthy: dict[str, float] = field(default_factory=dict)


def _check_known(resource: Registered, inputs: dict[str, Any]) -> None:
    known = KNOWN_INPUTS.get(resource.type)
    if known is None:
        raise UnknownInputError(f"{resource.name}: resource type {resource.type} is not mapped by the docker double")
    unknown = set(inputs) - known - MOCK_OUTPUTS
    if unknown:
        raise UnknownInputError(f"{resource.name} ({resource.type}): unmapped inputs {sorted(unknown)}")
    for key, allowed in KNOWN_NESTED.items():
        value = inputs.get(key)
        for item in value if isinstance(value, list) else [value] if isinstance(value, dict) else []:
            extra = set(item) - allowed
            if extra:
                raise UnknownInputError(f"{resource.name}: unmapped inputs {key}.{sorted(extra)}")


def _inputs(resource: Registered) -> dict[str, Any]:
    inputs = plain(resource.inputs)
    if resource.type == NETWORK or resource.type == VOLUME:
        # The mocks fill `name` with the logical name when the program sets none.
        inputs.setdefault("name", resource.name)
    return inputs


def upload_mode(upload: dict[str, Any]) -> int:
    """The file mode the provider gives an upload: `permissions` (octal) wins over `executable`."""
    if "permissions" in upload:
        return int(upload["permissions"], 8)
    return 0o744 if upload.get("executable") else 0o644


def _tar(path: str, content: bytes, mode: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(PurePosixPath(path).name)
        info.size = len(content)
        info.mode = mode
        info.mtime = int(time.time())
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def container_config(inputs: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    """The Engine API create body for a Container's inputs, mapped as pulumi-docker documents them.

    `ids` maps the ids the mocks gave (images, containers) to the engine's real ones.
    """
    image = ids.get(inputs["image"], inputs["image"])
    host_config: dict[str, Any] = {}
    body: dict[str, Any] = {"Image": image, "HostConfig": host_config}
    if "envs" in inputs:
        body["Env"] = list(inputs["envs"])
    if "command" in inputs:
        body["Cmd"] = list(inputs["command"])
    if "entrypoints" in inputs:
        body["Entrypoint"] = list(inputs["entrypoints"])
    if "stopSignal" in inputs:
        body["StopSignal"] = inputs["stopSignal"]
    if "stopTimeout" in inputs:
        body["StopTimeout"] = int(inputs["stopTimeout"])
    binds = []
    for volume in inputs.get("volumes", []):
        # kreuzwerker/docker: a named volume becomes the bind "name:path[:ro]".
        binds.append(f"{volume['volumeName']}:{volume['containerPath']}" + (":ro" if volume.get("readOnly") else ""))
    if binds:
        host_config["Binds"] = binds
    ports = inputs.get("ports", [])
    if ports:
        exposed, bindings = {}, {}
        for port in ports:
            key = f"{int(port['internal'])}/{port.get('protocol', 'tcp')}"
            exposed[key] = {}
            # ip defaults to 0.0.0.0 in pulumi-docker; the program must say 127.0.0.1.
            bindings.setdefault(key, []).append(
                {"HostIp": port.get("ip", "0.0.0.0"), "HostPort": str(int(port.get("external", port["internal"])))}  # noqa: S104
            )
        body["ExposedPorts"] = exposed
        host_config["PortBindings"] = bindings
    if "restart" in inputs:
        host_config["RestartPolicy"] = {"Name": inputs["restart"]}
    capabilities = inputs.get("capabilities", {})
    if capabilities.get("adds"):
        missing = capabilities_this_host_cannot_grant(capabilities["adds"])
        host_config["CapAdd"] = [name for name in capabilities["adds"] if name not in missing]
    if capabilities.get("drops"):
        host_config["CapDrop"] = list(capabilities["drops"])
    if "logDriver" in inputs or "logOpts" in inputs:
        host_config["LogConfig"] = {
            "Type": inputs.get("logDriver", "json-file"),
            "Config": dict(inputs.get("logOpts", {})),
        }
    networks = inputs.get("networksAdvanced", [])
    if "networkMode" in inputs:
        mode = inputs["networkMode"]
        if mode.startswith("container:"):
            target = mode.removeprefix("container:")
            mode = f"container:{ids.get(target, target)}"
        host_config["NetworkMode"] = mode
    elif networks:
        host_config["NetworkMode"] = networks[0]["name"]
        body["NetworkingConfig"] = {
            "EndpointsConfig": {networks[0]["name"]: {"Aliases": list(networks[0].get("aliases", []))}}
        }
    if "healthcheck" in inputs:
        check = inputs["healthcheck"]
        health = {"Test": list(check["tests"])}
        for key, api_key in (
            ("interval", "Interval"),
            ("timeout", "Timeout"),
            ("startPeriod", "StartPeriod"),
            ("startInterval", "StartInterval"),
        ):
            if key in check:
                health[api_key] = _duration_ns(check[key])
        if "retries" in check:
            health["Retries"] = int(check["retries"])
        body["Healthcheck"] = health
    return body


def _wait_healthy(api: EngineApi, container_id: str, name: str, timeout: float) -> float:
    started = time.monotonic()
    while True:
        state = api.call("GET", f"/containers/{container_id}/json")["State"]
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy" or (health is None and state["Running"]):
            return time.monotonic() - started
        if not state["Running"] and state["Status"] in {"exited", "dead"}:
            raise ApplyError(f"{name}: exited with {state['ExitCode']} before it was healthy")
        if time.monotonic() - started > timeout:
            raise ApplyError(f"{name}: not healthy within waitTimeout {timeout:.0f}s (health: {health})")
        time.sleep(0.1)


def _create_container(api: EngineApi, inputs: dict[str, Any], ids: dict[str, str]) -> str:
    body = container_config(inputs, ids)
    created = api.call("POST", "/containers/create", body, name=inputs["name"])
    container_id = created["Id"]
    for network in inputs.get("networksAdvanced", [])[1:]:
        api.call(
            "POST",
            f"/networks/{network['name']}/connect",
            {"Container": container_id, "EndpointConfig": {"Aliases": list(network.get("aliases", []))}},
        )
    # The provider copies each upload into the created container before it starts it.
    for upload in inputs.get("uploads", []):
        content = base64.b64decode(upload["contentBase64"]) if "contentBase64" in upload else upload["content"].encode()
        archive = _tar(upload["file"], content, upload_mode(upload))
        api.call(
            "PUT", f"/containers/{container_id}/archive", raw=archive, path=str(PurePosixPath(upload["file"]).parent)
        )
    return container_id


def apply(engine_host: str, run: ProgramRun) -> Applied:
    """Creates every docker resource of `run` in registration order (the order its dependencies allow)."""
    api = EngineApi(engine_host)
    applied = Applied(run=run)
    docker_resources = [resource for resource in run.resources if resource.type.startswith("docker:")]
    for resource in docker_resources:
        _check_known(resource, _inputs(resource))
    ids: dict[str, str] = {}
    # As `pulumi up` does: a resource is created once what it depends on is created, and a container
    # with `wait` counts as created only when healthy. Independent ones do not wait for each other.
    pending_waits: dict[str, tuple[str, str, str, float]] = {}
    started: dict[str, float] = {}

    def finish(urn: str) -> None:
        logical, container_id, name, timeout = pending_waits.pop(urn)
        _wait_healthy(api, container_id, name, timeout - (time.monotonic() - started[logical]))
        applied.seconds_to_healthy[logical] = time.monotonic() - started[logical]

    for resource in docker_resources:
        for dependency in resource.dependencies:
            if dependency in pending_waits:
                finish(dependency)
        inputs = _inputs(resource)
        if resource.type == NETWORK:
            api.call("POST", "/networks/create", {"Name": inputs["name"], "CheckDuplicate": True})
        elif resource.type == VOLUME:
            api.call("POST", "/volumes/create", {"Name": inputs["name"]})
        elif resource.type == REMOTE_IMAGE:
            # No registry is reachable: the image must already be in the engine (tests/images.py).
            found = api.call("GET", f"/images/{inputs['name']}/json")
            ids[mock_image_id(inputs["name"])] = found["Id"]
        elif resource.type == CONTAINER:
            missing = capabilities_this_host_cannot_grant(inputs.get("capabilities", {}).get("adds", []))
            if missing:
                applied.capabilities_not_granted[resource.name] = missing
            container_id = _create_container(api, inputs, ids)
            ids[mock_resource_id(resource.name)] = container_id
            applied.container_ids[resource.name] = container_id
            applied.container_names[resource.name] = inputs["name"]
            api.call("POST", f"/containers/{container_id}/start")
            started[resource.name] = time.monotonic()
            if inputs.get("wait"):
                timeout = float(inputs.get("waitTimeout", DEFAULT_WAIT_TIMEOUT_SECONDS))
                pending_waits[resource.urn] = (resource.name, container_id, inputs["name"], timeout)
    for urn in list(pending_waits):
        finish(urn)
    return applied


def destroy(engine_host: str, run: ProgramRun) -> None:
    """Deletes what `apply` created, in reverse order; keeps volumes with retainOnDelete and kept images."""
    api = EngineApi(engine_host)
    for resource in reversed([r for r in run.resources if r.type.startswith("docker:")]):
        inputs = _inputs(resource)
        try:
            if resource.type == CONTAINER:
                # destroyGraceSeconds: the provider stops the container with this timeout, then removes it.
                if "destroyGraceSeconds" in inputs:
                    api.call("POST", f"/containers/{inputs['name']}/stop", t=int(inputs["destroyGraceSeconds"]))
                api.call("DELETE", f"/containers/{inputs['name']}", force="true", v="false")
            elif resource.type == NETWORK:
                api.call("DELETE", f"/networks/{inputs['name']}")
            elif resource.type == VOLUME and not resource.retain_on_delete:
                api.call("DELETE", f"/volumes/{inputs['name']}")
            elif resource.type == REMOTE_IMAGE and not inputs.get("keepLocally"):
                api.call("DELETE", f"/images/{inputs['name']}")
        except ApplyError as error:
            if "404" not in str(error):
                raise
