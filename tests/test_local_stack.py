"""The real __main__.py under Pulumi.local.yaml, with mocks (preview=False): containers, ports, exports."""

import difflib

import pytest
from conftest import MOCK_TOKEN, is_secret_input, plain, run_program, vm_runtime_files

from components import cloud_config, runtime, runtime_config
from components.local_docker import LOCAL_SITE, PROXY_CONTAINER_PORT
from components.runtime import ProxySite

CONTAINER = "docker:index/container:Container"
COMPONENT = "chroma-infra:local:ChromaLocalDocker"


@pytest.fixture(scope="module")
def local_run():
    return run_program("local")


def containers(run):
    return {resource.name: resource for resource in run.of_type(CONTAINER)}


def proxy_uploads(run):
    """The proxy container's uploads, by path in the container."""
    uploads = plain(containers(run)["chroma-proxy"].inputs)["uploads"]
    return {upload["file"]: upload for upload in uploads}


def uploaded_caddyfile(run):
    uploads = proxy_uploads(run)
    assert set(uploads) == {"/etc/caddy/Caddyfile", runtime.PROXY_TOKEN_FILE}
    return uploads["/etc/caddy/Caddyfile"]["content"]


def test_only_local_resources_under_the_component(local_run):
    assert not [resource for resource in local_run.resources if resource.type.startswith("azure-native:")]
    local_run.one(COMPONENT)
    for resource in local_run.resources:
        if resource.type != COMPONENT:
            assert resource.parent.endswith(f"{COMPONENT}::chroma"), f"{resource.name} is not parented"
    assert sorted(resource.type for resource in local_run.resources if resource.type.startswith("docker:")) == [
        "docker:index/container:Container",
        "docker:index/container:Container",
        "docker:index/container:Container",
        "docker:index/network:Network",
        "docker:index/remoteImage:RemoteImage",
        "docker:index/remoteImage:RemoteImage",
        "docker:index/remoteImage:RemoteImage",
        "docker:index/volume:Volume",
    ]


def test_images_are_the_pinned_tags(local_run):
    images = {resource.inputs["name"] for resource in local_run.of_type("docker:index/remoteImage:RemoteImage")}
    assert images == {"chromadb/chroma:1.5.9", runtime.CADDY_IMAGE, runtime.GUARD_IMAGE}
    by_name = containers(local_run)
    assert by_name["chroma-chroma"].inputs["image"] == "sha256:mock-chromadb/chroma:1.5.9"
    assert by_name["chroma-proxy"].inputs["image"] == f"sha256:mock-{runtime.CADDY_IMAGE}"


def test_chroma_is_unpublished_with_its_data_in_the_named_volume(local_run):
    chroma = plain(containers(local_run)["chroma-chroma"].inputs)
    assert "ports" not in chroma, "Chroma must only be reachable through the proxy"
    (volume,) = chroma["volumes"]
    assert volume == {"volumeName": "chroma-infra-local-data", "containerPath": "/data"}
    guard = plain(containers(local_run)["chroma-guard"].inputs)
    assert guard["volumes"] == [volume], "the guard checks the same data"


def test_chroma_lives_in_the_proxys_network_namespace_on_loopback(local_run):
    by_name = containers(local_run)
    chroma = plain(by_name["chroma-chroma"].inputs)
    assert chroma["networkMode"] == "container:/mock/chroma-proxy", "joined by the proxy's id, re-created with it"
    assert "networksAdvanced" not in chroma, "an address on the stack network is reachable from the host"
    assert "CHROMA_LISTEN_ADDRESS=127.0.0.1" in chroma["envs"]
    assert "reverse_proxy 127.0.0.1:8000" in uploaded_caddyfile(local_run)
    guard = plain(by_name["chroma-guard"].inputs)
    assert guard["networkMode"] == chroma["networkMode"], "the guard reaches Chroma on the shared loopback"
    assert guard["command"][-1] == "http://127.0.0.1:8000"


def test_every_container_keeps_bounded_logs(local_run):
    for name, container in containers(local_run).items():
        assert container.inputs["logDriver"] == "json-file", name
        assert container.inputs["logOpts"] == {"max-size": "10m", "max-file": "3"}, name


def test_health_checks_start_early(local_run):
    for name in ("chroma-chroma", "chroma-proxy"):
        assert containers(local_run)[name].inputs["healthcheck"]["startInterval"] == "1s", name


def test_proxy_is_published_on_loopback_only(local_run):
    (port,) = plain(containers(local_run)["chroma-proxy"].inputs)["ports"]
    assert port["ip"] == "127.0.0.1"
    assert port["external"] == 8000
    assert port["internal"] == PROXY_CONTAINER_PORT


def test_host_port_is_configurable():
    run = run_program("local", {"hostPort": "18123"})
    (port,) = plain(containers(run)["chroma-proxy"].inputs)["ports"]
    assert port["external"] == 18123
    assert run.outputs["endpoint"] == "http://127.0.0.1:18123"


def test_health_checks_need_no_curl_and_containers_restart_and_are_waited_for(local_run):
    for name, container in containers(local_run).items():
        inputs = container.inputs
        assert inputs["restart"] == "unless-stopped", name
        if name == "chroma-guard":
            continue  # a loop that answers Chroma's starts; Chroma's own health waits for it
        assert inputs["wait"] is True, f"{name}: pulumi up must wait until it is healthy"
        assert inputs["waitTimeout"] >= 60, name
        tests = inputs["healthcheck"]["tests"]
        assert tests[0] == "CMD", name
        assert "curl" not in " ".join(tests), name
    by_name = containers(local_run)
    assert tuple(by_name["chroma-chroma"].inputs["healthcheck"]["tests"]) == runtime.CHROMA_HEALTHCHECK
    assert tuple(by_name["chroma-proxy"].inputs["healthcheck"]["tests"]) == runtime.PROXY_HEALTHCHECK


OOM_ENV = f"CHROMA_OOM_SCORE_ADJ={runtime.CHROMA_OOM_SCORE_ADJ}"


def test_no_otel_env_without_an_endpoint(local_run):
    assert plain(containers(local_run)["chroma-chroma"].inputs)["envs"] == ["CHROMA_LISTEN_ADDRESS=127.0.0.1", OOM_ENV]


def test_otel_env_is_the_vms_and_secret_with_headers():
    run = run_program(
        "local", {"otelEndpoint": "http://host.docker.internal:4317", "otelHeaders": "x-k=v"}, ("otelHeaders",)
    )
    envs = containers(run)["chroma-chroma"].inputs["envs"]
    assert is_secret_input(envs), "the exporter headers are a secret"
    assert sorted(plain(envs)) == sorted(
        [
            OOM_ENV,
            *(
                f"{key}={value}"
                for key, value in runtime.chroma_env(
                    runtime.OtelSettings("http://host.docker.internal:4317", "chromadb", "x-k=v")
                ).items()
            ),
        ]
    )


def test_the_token_file_upload_is_secret_root_only_and_the_caddyfile_holds_no_token(local_run):
    proxy = containers(local_run)["chroma-proxy"].inputs
    assert is_secret_input(proxy["uploads"]), "the token file is uploaded with the Caddyfile"
    token_file = proxy_uploads(local_run)[runtime.PROXY_TOKEN_FILE]
    assert token_file["content"] == f"{MOCK_TOKEN}\n"
    assert token_file["permissions"] == "0600", "root only, as on the VM (Caddy's image runs as root)"
    caddyfile = uploaded_caddyfile(local_run)
    assert MOCK_TOKEN not in caddyfile
    assert f'header_regexp token Authorization "{runtime.auth_pattern("Authorization")}"' in caddyfile
    assert f'"{{file.{runtime.PROXY_TOKEN_FILE}}}"' in caddyfile


def test_local_caddyfile_is_the_vms_but_for_the_declared_parameters(local_run, dev_run):
    local = uploaded_caddyfile(local_run)
    vm = vm_runtime_files(dev_run)[cloud_config.CADDYFILE]
    # Same renderer, same inputs: swapping only the ProxySite turns one into the other, byte for byte.
    assert runtime.render_caddyfile(LOCAL_SITE, "Authorization") == local
    vm_site = runtime_config.vm_site(dev_run.outputs["fqdn"])
    assert runtime.render_caddyfile(vm_site, "Authorization") == vm
    # The VM's proxy takes `caddy reload` on a socket in its own container; the local one has no admin API.
    assert vm_site == ProxySite(site_address=dev_run.outputs["fqdn"], admin_socket=runtime.PROXY_ADMIN_SOCKET)
    changed = [
        " ".join(line.split())
        for line in difflib.ndiff(vm.splitlines(), local.splitlines())
        if line[:1] in "+-" and not line[1:].strip().startswith("#")
    ]
    assert sorted(changed) == sorted(
        [
            f"- admin unix/{runtime.PROXY_ADMIN_SOCKET}",
            "+ admin off",
            f"- {dev_run.outputs['fqdn']} {{",
            f"+ {LOCAL_SITE.site_address} {{",
        ]
    )


def test_exports_match_the_azure_names(local_run, dev_run):
    assert local_run.outputs["endpoint"] == "http://127.0.0.1:8000"
    assert local_run.outputs["heartbeatUrl"] == "http://127.0.0.1:8000/api/v2/heartbeat"
    assert local_run.outputs["authHeader"] == "Authorization"
    assert local_run.outputs["authToken"] == MOCK_TOKEN
    assert local_run.outputs["chromaVersion"] == "1.5.9"
    assert local_run.outputs["dataVolume"] == "chroma-infra-local-data"
    shared = {"endpoint", "heartbeatUrl", "authHeader", "authToken", "chromaVersion"}
    assert shared <= set(local_run.outputs)
    assert shared <= set(dev_run.outputs)
    assert local_run.secret_outputs == {"authToken"}


def test_volume_is_kept_on_destroy_unless_unprotected(local_run):
    volume = local_run.one("docker:index/volume:Volume")
    assert volume.inputs["name"] == "chroma-infra-local-data", "a fixed name lets the next up find the data"
    assert volume.retain_on_delete, "protectDataDisk (default true) keeps the volume when the stack is destroyed"
    assert not run_program("local", {"protectDataDisk": "false"}).one("docker:index/volume:Volume").retain_on_delete


def test_configured_token_is_used_and_nothing_is_generated():
    token = "Local-Configured-Token-0123456789"
    run = run_program("local", {"authToken": token, "authHeader": "X-Chroma-Token"}, ("authToken",))
    assert not run.of_type("random:index/randomPassword:RandomPassword")
    assert 'header_regexp token X-Chroma-Token "' in uploaded_caddyfile(run)
    assert proxy_uploads(run)[runtime.PROXY_TOKEN_FILE]["content"] == f"{token}\n"
    assert run.outputs["authHeader"] == "X-Chroma-Token"


def test_chroma_starts_through_the_guard_and_stops_gently(local_run):
    by_name = containers(local_run)
    chroma, guard = plain(by_name["chroma-chroma"].inputs), plain(by_name["chroma-guard"].inputs)
    assert chroma["entrypoints"] == list(runtime.CHROMA_ENTRYPOINT)
    assert chroma["command"] == list(runtime.CHROMA_COMMAND)
    (script,) = chroma["uploads"]
    assert script["file"] == runtime.START_SCRIPT_PATH
    assert script["content"] == (runtime.TEMPLATE_DIR / "chroma-start.sh").read_text()
    assert chroma["stopSignal"] == "SIGTERM"
    assert chroma["stopTimeout"] == chroma["destroyGraceSeconds"] == runtime.CHROMA_STOP_GRACE_SECONDS
    assert chroma["capabilities"] == {"adds": ["SYS_RESOURCE"]}, "chroma-start.sh lowers its oom_score_adj"
    assert guard["command"] == list(runtime.GUARD_COMMAND)
    (tool,) = guard["uploads"]
    assert tool["file"] == runtime.DATA_TOOL_PATH
    assert tool["content"] == (runtime.SCRIPTS_DIR / "chroma_data.py").read_text()
    assert guard["networkMode"] == chroma["networkMode"], "it reaches Chroma on the shared loopback"


def test_named_containers_are_removed_before_their_replacement(local_run):
    # A chromaVersion bump replaces Chroma's container; Docker refuses a second one of the same name.
    containers = local_run.of_type("docker:index/container:Container")
    assert len(containers) == 3
    for container in containers:
        assert container.inputs["name"], f"{container.name} has a fixed name"
        assert container.delete_before_replace, f"{container.name} would collide with its own replacement"
