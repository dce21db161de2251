"""The VM's rendered cloud-config (valid for cloud-init old and new), and the runtime files its run command carries."""

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from components import cloud_config, runtime, runtime_config
from components.runtime import OtelSettings

# cloud-init 26.2's schema, vendored: see tests/schemas/README.md.
SCHEMA = Path(__file__).resolve().parent / "schemas" / "cloud-config-v1.json"
FQDN = "chroma-test.westeurope.cloudapp.azure.com"
TOKEN = "RenderTestToken0123456789abcdefghij"
OTEL = OtelSettings("http://collector.example.com:4317", "chroma-test", "x-team=abc,x-env=prod")


def runtime_files(otel=None, auth_header="Authorization", acme_email=None):
    return runtime_config.render_runtime_files(
        site=runtime_config.vm_site(FQDN),
        chroma_version="1.5.9",
        auth_header=auth_header,
        token=TOKEN,
        otel=otel,
        acme_email=acme_email,
    )


def compose_of(files):
    return yaml.safe_load(files.compose)


@pytest.fixture(scope="module")
def rendered():
    return cloud_config.render_cloud_config()


def test_real_cloud_init_accepts_it(rendered, tmp_path):
    cloud_init = shutil.which("cloud-init")
    if cloud_init is None:
        pytest.skip("cloud-init is not installed (apt-get install cloud-init); .ci/run installs it")
    path = tmp_path / "user-data.yaml"
    path.write_text(rendered, encoding="utf-8")
    result = subprocess.run([cloud_init, "schema", "--config-file", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid" in result.stdout


def test_cloud_init_26_schema_accepts_it(rendered):
    validator = jsonschema.Draft4Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))
    errors = [f"{list(error.path)}: {error.message}" for error in validator.iter_errors(yaml.safe_load(rendered))]
    assert errors == []


def test_the_stricter_schema_catches_a_misspelt_module(rendered):
    document = yaml.safe_load(rendered)
    document["write_file"] = document.pop("write_files")
    validator = jsonschema.Draft4Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))
    assert any("write_file" in error.message for error in validator.iter_errors(document))


def test_fits_azure_custom_data(rendered):
    import base64

    assert len(base64.b64encode(rendered.encode())) <= cloud_config.MAX_CUSTOM_DATA_BYTES


def test_docker_comes_from_ubuntu_packages_not_a_piped_script(rendered):
    document = yaml.safe_load(rendered)
    assert {"docker.io", "docker-compose-v2"} <= set(document["packages"])
    assert "curl" not in rendered
    assert "| sh" not in rendered
    assert "|sh" not in rendered


def test_runcmd_only_enables_the_disk_check_and_re_runs_udev(rendered):
    """Chroma is started by the data disk's udev rule; runcmd blocks on nothing (no --now without --no-block)."""
    assert yaml.safe_load(rendered)["runcmd"] == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", "--no-block", "chroma-data-disk.service"],
        ["udevadm", "control", "--reload"],
        ["udevadm", "trigger", "--subsystem-match=block", "--action=add"],
    ]


def test_scripts_are_executable_and_no_runtime_file_is_in_the_bootstrap(rendered):
    modes = {entry["path"]: entry["permissions"] for entry in yaml.safe_load(rendered)["write_files"]}
    assert modes[cloud_config.DISK_SCRIPT] == "0755"
    assert modes[cloud_config.APPLY_SCRIPT] == "0755"
    assert cloud_config.CADDYFILE not in modes, "the proxy config comes from the run command"
    assert cloud_config.COMPOSE_FILE not in modes, "the compose file comes from the run command"


def test_files_are_shipped_verbatim_from_cloud_init_dir(rendered):
    files = cloud_config.write_files(rendered)
    for unit in cloud_config.UNIT_FILES:
        assert files[f"{cloud_config.UNIT_DIR}/{unit}"] == (runtime.TEMPLATE_DIR / unit).read_text()
    assert files[cloud_config.DISK_SCRIPT] == (runtime.TEMPLATE_DIR / "prepare-data-disk.sh").read_text()
    assert files[cloud_config.APPLY_SCRIPT] == (runtime.TEMPLATE_DIR / "chroma-apply.sh").read_text()
    drop_in = (runtime.TEMPLATE_DIR / "chroma-data-device-timeout.conf").read_text()
    assert files[cloud_config.DEVICE_TIMEOUT_DROP_IN] == drop_in


@pytest.mark.parametrize("otel", [None, OTEL])
def test_chroma_is_on_no_host_port_and_its_data_only_on_the_disk(otel):
    chroma = compose_of(runtime_files(otel=otel))["services"]["chroma"]
    assert "ports" not in chroma
    volume, start_script = chroma["volumes"]
    assert start_script == {
        "type": "bind",
        "source": cloud_config.START_SCRIPT,
        "target": runtime.START_SCRIPT_PATH,
        "read_only": True,
        "bind": {"create_host_path": False},
    }
    assert volume["source"] == cloud_config.CHROMA_DATA_DIR
    assert volume["target"] == "/data"
    assert volume["source"].startswith(cloud_config.DATA_MOUNT + "/")
    assert volume["bind"]["create_host_path"] is False, "an unmounted disk must not become an OS-disk folder"
    assert chroma["image"] == "chromadb/chroma:1.5.9"


def test_proxy_publishes_only_http_and_https():
    proxy = compose_of(runtime_files())["services"]["proxy"]
    assert proxy["ports"] == ["80:80", "443:443"]
    assert proxy["image"] == runtime.CADDY_IMAGE
    assert ":" in proxy["image"]
    assert not proxy["image"].endswith(":latest")
    assert "depends_on" not in proxy, "the proxy owns the network namespace, so it starts first"


def test_chroma_listens_only_on_the_proxys_loopback():
    files = runtime_files()
    services = compose_of(files)["services"]
    chroma = services["chroma"]
    assert chroma["network_mode"] == "service:proxy", "no address of its own: only the proxy reaches Chroma"
    assert chroma["environment"]["CHROMA_LISTEN_ADDRESS"] == "127.0.0.1"
    assert chroma["depends_on"] == {"proxy": {"condition": "service_started", "restart": True}}
    assert "networks" not in chroma
    guard = services["guard"]
    assert guard["network_mode"] == "service:proxy", "the guard reaches Chroma on the shared loopback"
    assert guard["command"][-1] == "http://127.0.0.1:8000"
    assert "reverse_proxy 127.0.0.1:8000" in files.caddyfile


def test_chroma_and_the_proxy_keep_bounded_logs():
    services = compose_of(runtime_files())["services"]
    for name in ("chroma", "proxy"):
        assert services[name]["logging"] == {"driver": "json-file", "options": {"max-size": "10m", "max-file": "3"}}


def test_health_checks_start_early():
    services = compose_of(runtime_files())["services"]
    for name in ("chroma", "proxy"):
        assert services[name]["healthcheck"]["start_interval"] == "1s", name


def test_containers_restart_and_health_checks_need_no_curl():
    services = compose_of(runtime_files())["services"]
    assert set(services) == {"chroma", "guard", "proxy"}
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        if name == "guard":
            continue  # a loop that answers Chroma's starts; Chroma's own health waits for it
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        assert "curl" not in " ".join(test), name


def test_compose_dollars_are_escaped_so_compose_does_not_interpolate():
    test = compose_of(runtime_files())["services"]["chroma"]["healthcheck"]["test"]
    assert "$$status" in test[-1]
    assert [part.replace("$$", "$") for part in test] == list(runtime.CHROMA_HEALTHCHECK)


def test_no_otel_endpoint_means_no_otel_variable_at_all():
    environment = compose_of(runtime_files(otel=None))["services"]["chroma"]["environment"]
    assert environment == {"CHROMA_LISTEN_ADDRESS": "127.0.0.1"}
    assert "OPEN_TELEMETRY" not in runtime_files(otel=None).compose
    assert "OTEL_" not in runtime_files(otel=None).compose


def test_otel_uses_the_names_chroma_1x_honours():
    environment = compose_of(runtime_files(otel=OTEL))["services"]["chroma"]["environment"]
    assert environment == {
        "CHROMA_LISTEN_ADDRESS": "127.0.0.1",
        "CHROMA_OPEN_TELEMETRY__ENDPOINT": "http://collector.example.com:4317",
        "CHROMA_OPEN_TELEMETRY__SERVICE_NAME": "chroma-test",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-team=abc,x-env=prod",
        "OTEL_BSP_SCHEDULE_DELAY": runtime.OTEL_BATCH_DELAY_MS,
    }
    assert "CHROMA_OTEL_" not in runtime_files(otel=OTEL).compose


@pytest.mark.parametrize(("granularity", "level"), [("operation", "error"), ("operation_and_segment", "info")])
def test_granularity_becomes_chroma_1x_filters(granularity, level):
    otel = OtelSettings("http://collector.example.com:4317", "chroma", granularity=granularity)
    filters = runtime.chroma_env(otel)["CHROMA_OPEN_TELEMETRY__FILTERS"]
    assert filters.startswith("[{crate_name=")
    assert filters.endswith("}]")
    assert "{crate_name=chroma_tracing,filter_level=debug}" in filters, "the per-request spans stay"
    assert f"{{crate_name=chroma_frontend,filter_level={level}}}" in filters
    assert filters.count("crate_name=") == len(runtime.CHROMA_TRACING_CRATES)


def test_granularity_all_keeps_chromas_default():
    otel = OtelSettings("http://collector.example.com:4317", "chroma", granularity="all")
    assert "CHROMA_OPEN_TELEMETRY__FILTERS" not in runtime.chroma_env(otel)


@pytest.mark.parametrize(
    ("auth_header", "matcher"),
    [
        ("Authorization", 'header_regexp token Authorization "^(?i:bearer) +([-A-Za-z0-9._~+/]+=*)$"'),
        ("X-Chroma-Token", 'header_regexp token X-Chroma-Token "^([-A-Za-z0-9._~+/]+=*)$"'),
    ],
)
def test_caddyfile_serves_the_fqdn_and_checks_the_configured_header(auth_header, matcher):
    caddyfile = runtime_files(auth_header=auth_header).caddyfile
    assert f"\n{FQDN} {{\n" in caddyfile
    assert matcher in caddyfile
    assert f'@token_valid vars {{re.token.1}} "{{file.{runtime.PROXY_TOKEN_FILE}}}"' in caddyfile
    assert "tls internal" not in caddyfile
    assert "auto_https off" not in caddyfile
    assert "reverse_proxy 127.0.0.1:8000" in caddyfile
    assert 'respond "Unauthorized" 401' in caddyfile


def test_acme_email_reaches_caddy_only_when_set():
    with_email = runtime_files(acme_email="ops@example.com").caddyfile
    assert 'email "ops@example.com"' in with_email
    assert "cert_issuer" not in with_email, "with an email, Caddy's default issuers (Let's Encrypt, ZeroSSL) apply"
    without = runtime_files().caddyfile
    assert "email " not in without
    assert "cert_issuer acme\n" in without, "without an email, only Let's Encrypt: ZeroSSL needs one"


def test_the_caddyfile_holds_no_token_and_the_token_travels_apart():
    files = runtime_files()
    assert TOKEN not in files.caddyfile
    assert files.token == TOKEN
    assert runtime.token_file_content(TOKEN) == TOKEN + "\n", "Caddy's file placeholder trims one newline"
    # The proxy container sees the VM's token file at the path the Caddyfile names.
    (config_mount,) = [
        volume for volume in compose_of(files)["services"]["proxy"]["volumes"] if volume["target"] == "/etc/caddy"
    ]
    assert config_mount == {
        "type": "bind",
        "source": cloud_config.PROXY_CONFIG_DIR,
        "target": cloud_config.PROXY_CONFIG_MOUNT,
        "read_only": True,
        "bind": {"create_host_path": False},
    }, "a directory mount: a file mount would keep the replaced token file's inode"
    in_container = cloud_config.TOKEN_FILE.replace(cloud_config.PROXY_CONFIG_DIR, cloud_config.PROXY_CONFIG_MOUNT, 1)
    assert in_container == runtime_config.vm_site(FQDN).token_file == runtime.PROXY_TOKEN_FILE


@pytest.mark.parametrize("token", ["", "two words", "line\nend", 'quote"d', "{file./etc/passwd}", "tök"])
def test_a_token_the_proxy_cannot_compare_is_refused(token):
    with pytest.raises(ValueError, match=r"empty token|token68"):
        runtime.token_file_content(token)
    with pytest.raises(ValueError, match=r"empty token|token68"):
        runtime_config.render_run_command(
            fqdn=FQDN, chroma_version="1.5.9", auth_header="Authorization", token=token, otel=None, acme_email=None
        )


@pytest.mark.parametrize("path", ["etc/caddy/token", "/etc/caddy/to ken", "/etc/caddy/}", '/etc/"x', "/"])
def test_a_token_file_path_that_would_break_the_caddyfile_is_refused(path):
    with pytest.raises(ValueError, match="token_file must be an absolute path"):
        runtime.render_caddyfile(runtime.ProxySite(FQDN, token_file=path), "Authorization")


def test_chroma_starts_through_the_guard_and_stops_gently():
    services = compose_of(runtime_files())["services"]
    chroma, guard = services["chroma"], services["guard"]
    assert chroma["entrypoint"] == list(runtime.CHROMA_ENTRYPOINT)
    assert chroma["command"] == ["chroma", "run", "/config.yaml"], "the image's own command, wrapped"
    assert chroma["stop_signal"] == "SIGTERM"
    assert chroma["stop_grace_period"] == f"{runtime.CHROMA_STOP_GRACE_SECONDS}s"
    assert chroma["oom_score_adj"] < 0, "the OOM killer must prefer other processes"
    assert guard["image"] == runtime.GUARD_IMAGE
    assert guard["command"] == list(runtime.GUARD_COMMAND)
    data, tool = guard["volumes"]
    assert data["source"] == cloud_config.CHROMA_DATA_DIR
    assert data["target"] == runtime.CHROMA_DATA_PATH
    assert tool["source"] == cloud_config.DATA_TOOL
    assert tool["read_only"] is True
    assert guard["logging"] == {"driver": "journald", "options": {"tag": "chroma-guard"}}, "repairs are in the journal"


def test_the_start_script_and_data_tool_are_shipped_verbatim(rendered):
    files = cloud_config.write_files(rendered)
    assert files[cloud_config.START_SCRIPT] == (runtime.TEMPLATE_DIR / "chroma-start.sh").read_text()
    assert files[cloud_config.DATA_TOOL] == (runtime.SCRIPTS_DIR / "chroma_data.py").read_text()
    entries = {entry["path"]: entry for entry in yaml.safe_load(rendered)["write_files"]}
    assert entries[cloud_config.DATA_TOOL]["permissions"] == "0755", "the operator runs it as chroma-data"
    assert entries[cloud_config.DATA_TOOL]["encoding"] == "gz+b64", "compressed: custom data is capped at 64 KiB"


def test_the_health_site_binds_loopback_only():
    caddyfile = runtime_files().caddyfile
    health_site = caddyfile[caddyfile.index(f"http://127.0.0.1:{runtime.PROXY_HEALTH_PORT} {{") :]
    # A site address does not bind; without `bind`, another container got 200 from it.
    assert "\tbind 127.0.0.1\n" in health_site
