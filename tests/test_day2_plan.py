"""Under mocks: a day-2 change touches only the run command, never the VM, and no secret leaks.

Each settings change below is run through the real __main__.py twice (before, after). The VM's
registered inputs must be byte-identical (so Pulumi's plan shows neither an update nor a
replacement), the run command's inputs must differ (so Azure runs it again), and the token must
appear nowhere outside a secret: not in any resource input at any depth (base64 included), and not
in a plain export.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import pytest
from conftest import RUN_COMMAND, is_secret_input, run_command_parameters, run_program

from components import runtime_config
from components.runtime import OtelSettings

VM = "azure-native:compute:VirtualMachine"
TOKEN = "Day2PlanToken0123456789abcdefghij"
ROTATED = "Day2PlanRotated9876543210zyxwvuts"
OTEL_HEADER_SECRET = "OtelHeaderSecret0123456789"
BASE = {"authToken": TOKEN, "acmeEmail": "ops@example.com", "otelEndpoint": "http://a.example.com:4317"}
SECRETS = ("authToken", "otelHeaders")

CHANGES = {
    "chromaVersion": {"chromaVersion": "1.5.8"},
    "authToken": {"authToken": ROTATED},
    "authHeader": {"authHeader": "X-Chroma-Token"},
    "otelEndpoint": {"otelEndpoint": "http://b.example.com:4317"},
    "otelEndpoint unset": {"otelEndpoint": ""},
    "otelServiceName": {"otelServiceName": "vectors"},
    "otelHeaders": {"otelHeaders": f"x-key={OTEL_HEADER_SECRET}"},
    "otelGranularity": {"otelGranularity": "operation"},
    "acmeEmail": {"acmeEmail": "platform@example.com"},
}


@pytest.fixture(scope="module")
def before():
    return run_program("dev", BASE, SECRETS)


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_runtime_change_leaves_the_vm_byte_identical_and_reruns_the_run_command(before, change):
    after = run_program("dev", {**BASE, **change}, SECRETS)
    vm_before, vm_after = before.one(VM), after.one(VM)
    assert vm_after.inputs == vm_before.inputs, "the VM's inputs changed: Pulumi would replace it (custom data)"
    assert vm_after.replace_on_changes == vm_before.replace_on_changes
    assert after.one(RUN_COMMAND).inputs != before.one(RUN_COMMAND).inputs, (
        "the run command must change, or Azure never runs it"
    )
    unchanged = {
        (resource.type, resource.name): resource.inputs for resource in before.resources if resource.type != RUN_COMMAND
    }
    for resource in after.resources:
        if resource.type != RUN_COMMAND:
            assert unchanged[(resource.type, resource.name)] == resource.inputs, f"{resource.name} changed"


def test_only_the_run_command_carries_the_runtime_config(before):
    parameters = run_command_parameters(before)
    # What render_run_command gives (the VM tier and the day-2 tests run that), split the same way.
    expected = runtime_config.render_run_command(
        fqdn=before.outputs["fqdn"],
        chroma_version=before.outputs["chromaVersion"],
        auth_header="Authorization",
        token=TOKEN,
        otel=OtelSettings(BASE["otelEndpoint"], "chromadb"),
        acme_email=BASE["acmeEmail"],
    )
    for name in (runtime_config.IMAGE_PARAMETER, runtime_config.CADDYFILE_PARAMETER, runtime_config.TOKEN_PARAMETER):
        assert parameters[name] == expected.environment()[name], name
    command = before.one(RUN_COMMAND)
    plain_pairs, protected_pairs = command.inputs["parameters"], command.inputs["protectedParameters"]["value"]
    assert (
        {pair["name"] for pair in plain_pairs}
        == set(expected.parameters)
        == {
            runtime_config.IMAGE_PARAMETER,
            runtime_config.CADDYFILE_PARAMETER,
        }
    )
    assert (
        {pair["name"] for pair in protected_pairs}
        == set(expected.protected_parameters)
        == {
            runtime_config.TOKEN_PARAMETER,
            runtime_config.COMPOSE_PARAMETER,
        }
    )
    assert command.inputs["source"]["script"] == runtime_config.RUN_COMMAND_SCRIPT
    assert command.inputs["vmName"] == before.one(VM).name, "the mock names the VM by its logical name"
    assert any(urn.endswith(f"::{before.one(VM).name}") for urn in command.replace_with), (
        "a run command lives inside its VM: a new VM must get it created (and run) again"
    )
    assert command.inputs["treatFailureAsDeploymentFailure"] is True, "a failed apply must fail `pulumi up`"
    assert command.inputs["asyncExecution"] is False
    assert is_secret_input(command.inputs["protectedParameters"]), "the token and OTel headers"
    assert not is_secret_input(command.inputs["parameters"]), "the image and the proxy config stay readable in a plan"


def test_the_version_is_readable_in_the_plan_and_the_token_is_not():
    after = run_program("dev", {**BASE, "chromaVersion": "1.5.8"}, SECRETS)
    image, _ = after.one(RUN_COMMAND).inputs["parameters"]
    assert image == {"name": runtime_config.IMAGE_PARAMETER, "value": "chromadb/chroma:1.5.8"}


@pytest.mark.parametrize(
    ("change", "changed"),
    [
        ({"authToken": ROTATED}, {runtime_config.TOKEN_PARAMETER}),
        ({"authHeader": "X-Chroma-Token"}, {runtime_config.CADDYFILE_PARAMETER}),
        ({"acmeEmail": "platform@example.com"}, {runtime_config.CADDYFILE_PARAMETER}),
        ({"otelServiceName": "vectors"}, {runtime_config.COMPOSE_PARAMETER}),
        ({"chromaVersion": "1.5.8"}, {runtime_config.IMAGE_PARAMETER, runtime_config.COMPOSE_PARAMETER}),
    ],
    ids=["authToken", "authHeader", "acmeEmail", "otelServiceName", "chromaVersion"],
)
def test_each_change_reaches_only_its_own_parameters(before, change, changed):
    """A rotation changes the token alone, so chroma-apply swaps the token file and reloads nothing."""
    old, new = run_command_parameters(before), run_command_parameters(run_program("dev", {**BASE, **change}, SECRETS))
    assert {name for name in old if old[name] != new[name]} == changed


def leaks(value: Any, secret: str, where: str) -> list[str]:
    """Every place outside a secret wrapper where `secret` shows, as text or inside base64."""
    if is_secret_input(value):
        return []
    if isinstance(value, dict):
        return [hit for key, item in value.items() for hit in leaks(item, secret, f"{where}.{key}")]
    if isinstance(value, list):
        return [hit for index, item in enumerate(value) for hit in leaks(item, secret, f"{where}[{index}]")]
    if not isinstance(value, str):
        return []
    found = [where] if secret in value else []
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8", errors="ignore")
    except (binascii.Error, ValueError):
        decoded = ""
    if secret in decoded:
        found.append(f"{where} (base64)")
    return found


def test_the_leak_check_sees_a_secret_in_base64_and_not_inside_a_secret():
    from pulumi.runtime import rpc

    encoded = base64.b64encode(f"header Authorization Bearer {TOKEN}\n".encode()).decode()
    assert leaks({"files": [encoded]}, TOKEN, "r") == ["r.files[0] (base64)"]
    assert leaks({"a": f"x{TOKEN}"}, TOKEN, "r") == ["r.a"]
    wrapped = {rpc._special_sig_key: rpc._special_secret_sig, "value": encoded}
    assert leaks({"files": wrapped}, TOKEN, "r") == []


@pytest.mark.parametrize(
    ("secret", "overrides"),
    [
        (TOKEN, {}),
        (OTEL_HEADER_SECRET, {"otelHeaders": f"x-key={OTEL_HEADER_SECRET}"}),
    ],
    ids=["authToken", "otelHeaders"],
)
def test_secrets_appear_only_inside_secret_values(secret, overrides):
    run = run_program("dev", {**BASE, **overrides}, SECRETS)
    found = [hit for resource in run.resources for hit in leaks(resource.inputs, secret, resource.name)]
    assert found == [], f"a secret shows in plain inputs: {found}"
    for name, value in run.outputs.items():
        if name not in run.secret_outputs:
            assert leaks(value, secret, name) == [], f"export {name} shows a secret"
    custom_data = run.one(VM).inputs["osProfile"]["customData"]
    assert not is_secret_input(custom_data), "custom data holds no secret, so it stays readable"
    assert secret not in base64.b64decode(custom_data).decode()
    # And it does reach the VM, inside the protected parameters: the token in its own, as itself.
    protected = run.one(RUN_COMMAND).inputs["protectedParameters"]
    assert is_secret_input(protected)
    values = {pair["name"]: pair["value"] for pair in protected["value"]}
    if secret == TOKEN:
        assert values[runtime_config.TOKEN_PARAMETER] == TOKEN
        compose = base64.b64decode(values[runtime_config.COMPOSE_PARAMETER]).decode()
        assert TOKEN not in compose, "the token travels in one parameter only"
    else:
        assert secret in base64.b64decode(values[runtime_config.COMPOSE_PARAMETER]).decode()
