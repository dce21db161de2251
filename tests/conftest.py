"""The one Mocks class, and a runner for the real __main__.py under a stack file's config.

Runs use preview=False: in preview, outputs the mock does not return are unknown, apply
callbacks are skipped, and assertions would check nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml
from pulumi.runtime import rpc
from pulumi.runtime import settings as pulumi_settings
from pulumi.runtime.mocks import MockMonitor
from pulumi.runtime.stack import run_in_stack

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "chroma-infra"
MOCK_IP = "203.0.113.10"
MOCK_REGION = "mockregion"
MOCK_TOKEN = "MockGeneratedToken0123456789abcdefghijKL"
MOCK_PRIVATE_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nmock\n-----END OPENSSH PRIVATE KEY-----\n"
MOCK_PRINCIPAL_ID = "11111111-2222-3333-4444-555555555555"
MOCK_SUBSCRIPTION_ID = "99999999-8888-7777-6666-555555555555"
MOCK_PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMockGeneratedKey generated"


def mock_resource_id(logical_name: str) -> str:
    """The id the mocks give every resource (a container's id is what `container:<id>` names)."""
    return f"/mock/{logical_name}"


def mock_image_id(image_name: str) -> str:
    """The image id the mocks give a RemoteImage: never a real one, so a test double must map it."""
    return f"sha256:mock-{image_name}"


@dataclass
class Registered:
    """One resource as the engine saw it: its inputs and the options that matter for policy."""

    type: str
    name: str
    inputs: dict[str, Any]
    parent: str
    protect: bool
    delete_before_replace: bool
    replace_on_changes: list[str]
    retain_on_delete: bool
    urn: str = ""
    # The URNs it depends on (its inputs' resources and dependsOn): what waits for what on `up`.
    dependencies: list[str] = field(default_factory=list)
    replace_with: list[str] = field(default_factory=list)


class Mocks(pulumi.runtime.Mocks):
    """Echoes inputs and fills in what the providers compute; values differ from any config."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        outputs = {"name": args.name, **args.inputs}
        if args.typ == "azure-native:network:PublicIPAddress":
            dns = args.inputs.get("dnsSettings", {})
            outputs["ipAddress"] = MOCK_IP
            outputs["dnsSettings"] = {**dns, "fqdn": f"{dns.get('domainNameLabel')}.{MOCK_REGION}.cloudapp.azure.com"}
        elif args.typ == "random:index/randomPassword:RandomPassword":
            outputs["result"] = MOCK_TOKEN[: int(args.inputs["length"])]
        elif args.typ == "random:index/randomString:RandomString":
            outputs["result"] = "q7x2k9"[: int(args.inputs["length"])]
        elif args.typ == "docker:index/remoteImage:RemoteImage":
            outputs["imageId"] = mock_image_id(args.inputs["name"])
        elif args.typ == "azure-native:dataprotection:BackupVault":
            outputs["identity"] = {**args.inputs.get("identity", {}), "principalId": MOCK_PRINCIPAL_ID}
        elif args.typ == "tls:index/privateKey:PrivateKey":
            outputs["publicKeyOpenssh"] = MOCK_PUBLIC_KEY
            outputs["privateKeyOpenssh"] = MOCK_PRIVATE_KEY
        return mock_resource_id(args.name), outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        # A bare dict: the SDK reads a tuple's second item as a list of check failures.
        if args.token == "azure-native:authorization:getClientConfig":
            return {
                "subscriptionId": MOCK_SUBSCRIPTION_ID,
                "tenantId": "00000000-0000-0000-0000-0000000000aa",
                "clientId": "00000000-0000-0000-0000-0000000000bb",
                "objectId": "00000000-0000-0000-0000-0000000000cc",
            }
        return {}


class RecordingMonitor(MockMonitor):
    """The SDK's mock monitor, also keeping each resource's options."""

    def __init__(self, mocks: Mocks) -> None:
        super().__init__(mocks)
        self.registered: list[Registered] = []

    def RegisterResource(self, request):  # noqa: N802 - the gRPC method name
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            self.registered.append(
                Registered(
                    type=request.type,
                    name=request.name,
                    inputs=self.resources[response.urn].state if request.custom else {},
                    parent=request.parent,
                    protect=request.protect,
                    delete_before_replace=request.deleteBeforeReplace,
                    replace_on_changes=list(request.replaceOnChanges),
                    retain_on_delete=request.retainOnDelete,
                    urn=response.urn,
                    dependencies=list(request.dependencies),
                    replace_with=list(request.replace_with),
                )
            )
        return response


@dataclass
class ProgramRun:
    """What one run of __main__.py registered and exported."""

    resources: list[Registered]
    outputs: dict[str, Any] = field(default_factory=dict)
    secret_outputs: set[str] = field(default_factory=set)

    def of_type(self, type_token: str) -> list[Registered]:
        return [resource for resource in self.resources if resource.type == type_token]

    def one(self, type_token: str) -> Registered:
        found = self.of_type(type_token)
        assert len(found) == 1, f"expected one {type_token}, found {len(found)}"
        return found[0]


def stack_config(stack: str) -> dict[str, str]:
    """A stack file's config, as the CLI would pass it: full keys, every value a string."""
    document = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text(encoding="utf-8"))
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in (document.get("config") or {}).items()
    }


def run_program(
    stack: str, overrides: dict[str, Any] | None = None, secrets: tuple[str, ...] = (), stack_name: str | None = None
) -> ProgramRun:
    """Runs the real __main__.py with Pulumi.<stack>.yaml plus overrides (short keys, project namespace).

    `stack_name` runs it as another stack with the same config file (for unique resource names).
    """
    config = stack_config(stack)
    for key, value in (overrides or {}).items():
        full_key = key if ":" in key else f"{PROJECT}:{key}"
        if value is None:
            config.pop(full_key, None)
        else:
            config[full_key] = value if isinstance(value, str) else json.dumps(value)
    secret_keys = [key if ":" in key else f"{PROJECT}:{key}" for key in secrets]
    environment = {"PULUMI_CONFIG": json.dumps(config), "PULUMI_CONFIG_SECRET_KEYS": json.dumps(secret_keys)}
    previous = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    monitor = RecordingMonitor(Mocks())
    captured: dict[str, Any] = {}

    def program() -> None:
        captured["stack"] = pulumi_settings.get_root_resource()
        runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")

    try:
        # What Pulumi's Python launcher does before it runs the program.
        pulumi.runtime.set_all_config(config, secret_keys)
        pulumi_settings.set_root_resource(None)
        pulumi.runtime.set_mocks(Mocks(), project=PROJECT, stack=stack_name or stack, preview=False, monitor=monitor)
        pulumi_settings.set_root_resource(None)
        loop.run_until_complete(run_in_stack(program))
        run = ProgramRun(resources=monitor.registered)

        async def resolve() -> None:
            for name, value in captured["stack"].outputs.items():
                output = pulumi.Output.from_input(value)
                run.outputs[name] = await output.future()
                if await output.is_secret():
                    run.secret_outputs.add(name)

        loop.run_until_complete(resolve())
        return run
    finally:
        loop.close()
        asyncio.set_event_loop(None)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_secret_input(value: Any) -> bool:
    """A secret input reaches the mock wrapped in Pulumi's secret signature object."""
    return isinstance(value, dict) and value.get(rpc._special_sig_key) == rpc._special_secret_sig


def plain(value: Any) -> Any:
    """The value with every secret wrapper removed, at any depth."""
    if is_secret_input(value):
        return plain(value["value"])
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


RUN_COMMAND = "azure-native:compute:VirtualMachineRunCommandByVirtualMachine"


def run_command_parameters(run: ProgramRun) -> dict[str, str]:
    """Every parameter of the VM's run command, plain and protected, as the script's environment sees them."""
    inputs = plain(run.one(RUN_COMMAND).inputs)
    pairs = [*inputs.get("parameters", []), *inputs.get("protectedParameters", [])]
    return {pair["name"]: pair["value"] for pair in pairs}


def vm_runtime_files(run: ProgramRun) -> dict[str, str]:
    """Path on the VM -> content of the two files the run command delivers (decoded from base64)."""
    from components import cloud_config, runtime_config

    parameters = run_command_parameters(run)
    return {
        cloud_config.CADDYFILE: base64.b64decode(parameters[runtime_config.CADDYFILE_PARAMETER]).decode(),
        cloud_config.COMPOSE_FILE: base64.b64decode(parameters[runtime_config.COMPOSE_PARAMETER]).decode(),
    }


@pytest.fixture(scope="module")
def dev_run() -> ProgramRun:
    """The dev stack exactly as committed."""
    return run_program("dev")


_skipped_in_ci: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remembers skips: CI installs every tool, so there a skip means something is missing."""
    if report.skipped and os.environ.get("CI") == "true":
        _skipped_in_ci.append(report.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fails a CI run that skipped anything."""
    if _skipped_in_ci and session.exitstatus == pytest.ExitCode.OK:
        print(f"\nCI=true and {len(_skipped_in_ci)} test(s) skipped; in CI a skip is a failure:")
        for nodeid in _skipped_in_ci:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def docker_engine():
    """A Docker engine for the session: the one that answers, or a private dockerd stopped at the end."""
    from engine import EngineUnavailableError, docker_engine

    with contextlib.ExitStack() as stack:
        try:
            found = stack.enter_context(docker_engine())
        except EngineUnavailableError as error:
            pytest.skip(f"no Docker engine: {error}")
        yield found


@dataclass
class StandIns:
    """The stand-in images in the session's engine, and how long it took to have them."""

    images: dict[str, str]
    seconds: float


@pytest.fixture(scope="session")
def standin_images(docker_engine) -> StandIns:
    """`chromadb/chroma:<pin>` and `caddy:<pin>` stand-ins (tests/images.py), built or cached."""
    import time

    from images import ensure_images

    started = time.monotonic()
    images = ensure_images(docker_engine)
    return StandIns(images=images, seconds=time.monotonic() - started)
