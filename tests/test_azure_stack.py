"""The real __main__.py under Pulumi.dev.yaml, with mocks (preview=False): resources, policy, exports."""

import base64

import pytest
import yaml
from conftest import MOCK_TOKEN, PROJECT, is_secret_input, plain, run_command_parameters, run_program, vm_runtime_files

from components import cloud_config, runtime, runtime_config

VM = "azure-native:compute:VirtualMachine"
DISK = "azure-native:compute:Disk"
NSG = "azure-native:network:NetworkSecurityGroup"
PIP = "azure-native:network:PublicIPAddress"
COMPONENT = "chroma-infra:azure:ChromaAzureVm"


def inbound_rules(run):
    return {rule["name"]: rule for rule in plain(run.one(NSG).inputs)["securityRules"]}


def vm_cloud_config(run):
    custom_data = plain(run.one(VM).inputs)["osProfile"]["customData"]
    return base64.b64decode(custom_data).decode()


def test_every_resource_is_a_child_of_the_component(dev_run):
    component = dev_run.one(COMPONENT)
    assert component.parent.endswith(f"{PROJECT}-dev"), "the component sits under the stack"
    children = [resource for resource in dev_run.resources if resource.type != COMPONENT]
    assert children, "the component registers children"
    # Sub-components (the backup) sit under the component, and their resources under them.
    sub_components = {f"{r.type}::{r.name}" for r in children if r.type.startswith("chroma-infra:")}
    for resource in children:
        parent = resource.parent
        assert parent.endswith(f"{COMPONENT}::chroma") or any(
            parent.startswith(f"urn:pulumi:dev::{PROJECT}::{COMPONENT}$") and parent.endswith(sub)
            for sub in sub_components
        ), f"{resource.type} {resource.name} is not parented"
        assert resource.name.startswith("chroma-"), resource.name


def test_the_expected_resources_are_registered(dev_run):
    types = sorted(resource.type for resource in dev_run.resources)
    for expected in [
        "azure-native:resources:ResourceGroup",  # compute, and the data disk's own
        "azure-native:network:VirtualNetwork",
        "azure-native:network:Subnet",
        NSG,
        PIP,
        "azure-native:network:NetworkInterface",
        DISK,
        VM,
        "random:index/randomPassword:RandomPassword",
        "tls:index/privateKey:PrivateKey",
    ]:
        assert types.count(expected) == (2 if expected.endswith("ResourceGroup") else 1), f"{expected} count"


def test_https_is_open_to_allowed_cidrs_and_http_only_for_acme(dev_run):
    rules = inbound_rules(dev_run)
    assert rules["allow-https"]["destinationPortRange"] == "443"
    assert rules["allow-https"]["sourceAddressPrefixes"] == ["0.0.0.0/0"]
    assert rules["allow-http"]["destinationPortRange"] == "80"


def test_ssh_is_closed_by_default(dev_run):
    rules = inbound_rules(dev_run)
    assert "allow-ssh" not in rules, "no sshAllowedCidrs means no SSH inbound rule"
    assert all(rule["destinationPortRange"] != "22" for rule in rules.values())
    assert "sshCommand" not in dev_run.outputs


def test_chromas_port_is_never_opened(dev_run):
    for rule in inbound_rules(dev_run).values():
        assert rule["destinationPortRange"] not in ("8000", "*"), f"{rule['name']} opens Chroma's port"
        assert rule["access"] == "Allow"
        assert rule["protocol"] == "Tcp"


def test_restricted_cidrs_and_ssh_reach_the_rules():
    run = run_program("dev", {"allowedCidrs": ["198.51.100.0/24"], "sshAllowedCidrs": ["203.0.113.7/32"]})
    rules = inbound_rules(run)
    assert rules["allow-https"]["sourceAddressPrefixes"] == ["198.51.100.0/24"]
    assert rules["allow-ssh"]["sourceAddressPrefixes"] == ["203.0.113.7/32"]
    assert rules["allow-ssh"]["destinationPortRange"] == "22"
    assert rules["allow-http"]["sourceAddressPrefixes"] == ["0.0.0.0/0"], "ACME must reach port 80 from anywhere"
    assert run.outputs["sshCommand"].endswith(f"azureuser@{run.outputs['fqdn']}")
    assert "sshPrivateKey --show-secrets" in run.outputs["sshCommand"]


def test_public_ip_is_standard_static_with_a_stable_label(dev_run):
    pip = dev_run.one(PIP).inputs
    assert pip["sku"]["name"] == "Standard"
    assert pip["publicIPAllocationMethod"] == "Static"
    assert pip["dnsSettings"]["domainNameLabel"] == "chroma-infra-dev-q7x2k9", "project-stack-<random suffix>"


def test_configured_dns_label_is_used_as_is():
    run = run_program("dev", {"dnsLabel": "team-chroma"})
    assert run.one(PIP).inputs["dnsSettings"]["domainNameLabel"] == "team-chroma"
    assert not run.of_type("random:index/randomString:RandomString")


def test_vm_is_ubuntu_2404_key_only_and_replaced_when_custom_data_changes(dev_run):
    vm = dev_run.one(VM)
    inputs = plain(vm.inputs)
    image = inputs["storageProfile"]["imageReference"]
    assert (image["publisher"], image["offer"], image["sku"]) == ("Canonical", "ubuntu-24_04-lts", "server")
    assert inputs["hardwareProfile"]["vmSize"] == "Standard_D2s_v5"
    linux = inputs["osProfile"]["linuxConfiguration"]
    assert linux["disablePasswordAuthentication"] is True
    assert linux["ssh"]["publicKeys"][0]["keyData"].startswith("ssh-ed25519 ")
    assert "adminPassword" not in inputs["osProfile"]
    assert vm.replace_on_changes == ["osProfile.customData", "zones"]
    assert vm.delete_before_replace, "the data disk can attach to one VM at a time"


def test_custom_data_is_the_bootstrap_only_and_the_run_command_carries_the_proxy_config(dev_run):
    assert vm_cloud_config(dev_run) == cloud_config.render_cloud_config()
    document = yaml.safe_load(vm_cloud_config(dev_run))
    assert document["runcmd"][-1] == ["udevadm", "trigger", "--subsystem-match=block", "--action=add"]
    assert MOCK_TOKEN not in vm_cloud_config(dev_run), "custom data is not for secrets"
    caddyfile = vm_runtime_files(dev_run)[cloud_config.CADDYFILE]
    assert f"\n{dev_run.outputs['fqdn']} {{" in caddyfile
    assert f'header_regexp token Authorization "{runtime.auth_pattern("Authorization")}"' in caddyfile
    assert MOCK_TOKEN not in caddyfile
    assert run_command_parameters(dev_run)[runtime_config.TOKEN_PARAMETER] == MOCK_TOKEN


def test_data_disk_is_empty_attached_by_lun_detached_on_delete_and_protected(dev_run):
    disk = dev_run.one(DISK)
    assert disk.inputs["creationData"]["createOption"] == "Empty"
    assert disk.inputs["diskSizeGB"] == 64
    assert disk.inputs["sku"]["name"] == "Premium_LRS"
    assert disk.protect, "protectDataDisk defaults to true"
    (attached,) = plain(dev_run.one(VM).inputs)["storageProfile"]["dataDisks"]
    assert attached["lun"] == 0
    assert attached["createOption"] == "Attach"
    assert attached["managedDisk"]["id"] == "/mock/chroma-data"
    assert attached["deleteOption"] == "Detach", "deleting the VM must leave the data disk"
    os_disk = plain(dev_run.one(VM).inputs)["storageProfile"]["osDisk"]
    assert os_disk["deleteOption"] == "Delete"


def test_data_disk_has_a_protected_resource_group_of_its_own(dev_run):
    groups = {group.name: group for group in dev_run.of_type("azure-native:resources:ResourceGroup")}
    assert set(groups) == {"chroma-rg", "chroma-data-rg"}
    assert dev_run.one(DISK).inputs["resourceGroupName"] == "chroma-data-rg", (
        "deleting the compute group would take the disk with it"
    )
    assert groups["chroma-data-rg"].protect
    assert not groups["chroma-rg"].protect
    assert dev_run.one(VM).inputs["resourceGroupName"] == "chroma-rg"


def test_throwaway_stack_can_unprotect_the_disk():
    run = run_program("dev", {"protectDataDisk": "false", "dataDiskSizeGb": "256", "dataDiskSku": "StandardSSD_LRS"})
    disk = run.one(DISK)
    assert not disk.protect
    assert not any(group.protect for group in run.of_type("azure-native:resources:ResourceGroup"))
    assert disk.inputs["diskSizeGB"] == 256
    assert disk.inputs["sku"]["name"] == "StandardSSD_LRS"


def test_nvme_only_size_gets_the_nvme_controller():
    assert "diskControllerType" not in plain(run_program("dev").one(VM).inputs)["storageProfile"]
    run = run_program("dev", {"vmSize": "Standard_D2s_v6"})
    assert plain(run.one(VM).inputs)["storageProfile"]["diskControllerType"] == "NVMe"


def test_exports(dev_run):
    outputs = dev_run.outputs
    fqdn = outputs["fqdn"]
    assert fqdn == "chroma-infra-dev-q7x2k9.mockregion.cloudapp.azure.com"
    assert outputs["endpoint"] == f"https://{fqdn}"
    assert outputs["heartbeatUrl"] == f"https://{fqdn}/api/v2/heartbeat"
    assert outputs["publicIp"] == "203.0.113.10"
    assert outputs["authHeader"] == "Authorization"
    assert outputs["authToken"] == MOCK_TOKEN
    assert outputs["chromaVersion"] == "1.5.9"
    assert outputs["dataDiskId"] == "/mock/chroma-data"


def test_only_the_token_and_private_key_exports_are_secret(dev_run):
    assert dev_run.secret_outputs == {"authToken", "sshPrivateKey"}


def test_generated_token_is_long_alphanumeric_and_kept_by_pulumi_random(dev_run):
    password = dev_run.one("random:index/randomPassword:RandomPassword")
    assert password.inputs["length"] >= 32
    assert password.inputs["special"] is False


def test_configured_token_and_key_are_used_and_nothing_is_generated():
    token = "Configured-Token_0123456789.abc"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE+eW+eW5ykAzr6dFSbUuu7FRUzcJ9I5DLSOIqkng4oK user@laptop"
    run = run_program("dev", {"authToken": token, "sshPublicKey": key, "authHeader": "X-Chroma-Token"}, ("authToken",))
    assert not run.of_type("random:index/randomPassword:RandomPassword")
    assert not run.of_type("tls:index/privateKey:PrivateKey")
    assert run.outputs["authToken"] == token
    assert "authToken" in run.secret_outputs
    assert "sshPrivateKey" not in run.outputs
    assert plain(run.one(VM).inputs)["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"] == key
    caddyfile = vm_runtime_files(run)[cloud_config.CADDYFILE]
    assert f'header_regexp token X-Chroma-Token "{runtime.auth_pattern("X-Chroma-Token")}"' in caddyfile
    assert run_command_parameters(run)[runtime_config.TOKEN_PARAMETER] == token


def test_otel_settings_reach_the_vm():
    run = run_program(
        "dev",
        {"otelEndpoint": "http://collector.example.com:4317", "otelHeaders": "x-team=abc", "otelServiceName": "vecdb"},
        ("otelHeaders",),
    )
    compose = yaml.safe_load(vm_runtime_files(run)[cloud_config.COMPOSE_FILE])
    assert compose["services"]["chroma"]["environment"] == {
        "CHROMA_LISTEN_ADDRESS": "127.0.0.1",
        "CHROMA_OPEN_TELEMETRY__ENDPOINT": "http://collector.example.com:4317",
        "CHROMA_OPEN_TELEMETRY__SERVICE_NAME": "vecdb",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-team=abc",
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
    }


@pytest.mark.parametrize("secret_key", ["authToken", "otelHeaders"])
def test_no_secret_reaches_an_unsecret_output_or_input(secret_key):
    value = "Sup3rSecretValue0123456789" if secret_key == "authToken" else "x-key=Sup3rSecretValue0123456789"
    run = run_program("dev", {secret_key: value, "otelEndpoint": "http://c.example.com:4317"}, (secret_key,))
    for name, output in run.outputs.items():
        if "Sup3rSecretValue" in str(output):
            assert name in run.secret_outputs, f"export {name} shows {secret_key} in plain text"
    for resource in run.resources:
        for field, field_value in resource.inputs.items():
            if "Sup3rSecretValue" in str(plain(field_value)):
                assert is_secret_input(field_value), f"{resource.name}.{field} carries {secret_key} unencrypted"
