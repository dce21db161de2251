"""The docker provider double itself: it maps inputs as pulumi-docker documents them and refuses the rest."""

import pytest
from conftest import ProgramRun, Registered, run_program
from docker_provider import UnknownInputError, _check_known, _inputs, container_config, upload_mode

CONTAINER = "docker:index/container:Container"


def registered(inputs, type_token=CONTAINER):
    return Registered(type_token, "thing", inputs, "", False, False, [], False)


def test_every_input_the_local_stack_registers_is_mapped():
    run: ProgramRun = run_program("local", {"otelEndpoint": "http://127.0.0.1:4317"})
    docker_resources = [resource for resource in run.resources if resource.type.startswith("docker:")]
    assert len(docker_resources) == 8  # network, volume, three images, proxy, guard, chroma
    for resource in docker_resources:
        _check_known(resource, _inputs(resource))


@pytest.mark.parametrize(
    "inputs",
    [{"name": "c", "image": "i", "memory": 512}, {"name": "c", "image": "i", "healthcheck": {"tests": [], "x": 1}}],
    ids=["top-level", "nested"],
)
def test_an_input_it_does_not_know_fails_the_apply(inputs):
    with pytest.raises(UnknownInputError, match="unmapped inputs"):
        _check_known(registered(inputs), inputs)


def test_an_unknown_resource_type_fails_the_apply():
    with pytest.raises(UnknownInputError, match="not mapped"):
        _check_known(registered({}, "docker:index/service:Service"), {})


def test_inputs_become_the_engine_api_fields_the_provider_sends():
    body = container_config(
        {
            "name": "c",
            "image": "sha256:mock-x",
            "ports": [{"internal": 8080.0, "external": 18000.0, "ip": "127.0.0.1"}],
            "volumes": [{"volumeName": "v", "containerPath": "/data"}],
            "networkMode": "container:/mock/proxy",
            "healthcheck": {"tests": ["CMD", "true"], "interval": "10s", "startInterval": "500ms", "retries": 6.0},
            "logDriver": "json-file",
            "logOpts": {"max-size": "10m"},
            "restart": "unless-stopped",
        },
        {"sha256:mock-x": "sha256:real", "/mock/proxy": "abc123"},
    )
    assert body["Image"] == "sha256:real"
    assert body["HostConfig"]["PortBindings"] == {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18000"}]}
    assert body["HostConfig"]["Binds"] == ["v:/data"]
    assert body["HostConfig"]["NetworkMode"] == "container:abc123"
    health = body["Healthcheck"]
    assert health == {"Test": ["CMD", "true"], "Interval": 10**10, "StartInterval": 5 * 10**8, "Retries": 6}
    assert body["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "10m"}}
    assert body["HostConfig"]["RestartPolicy"] == {"Name": "unless-stopped"}


def test_a_port_without_ip_is_published_on_every_interface_as_the_provider_does():
    body = container_config({"name": "c", "image": "i", "ports": [{"internal": 80.0}]}, {})
    assert body["HostConfig"]["PortBindings"] == {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "80"}]}  # noqa: S104


def test_an_uploads_mode_is_its_permissions_else_executable_or_not():
    assert upload_mode({"file": "/t", "content": "x", "permissions": "0600"}) == 0o600
    assert upload_mode({"file": "/t", "content": "x", "permissions": "0600", "executable": True}) == 0o600
    assert upload_mode({"file": "/t", "content": "x", "executable": True}) == 0o744
    assert upload_mode({"file": "/t", "content": "x"}) == 0o644
