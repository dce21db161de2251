"""Stack config validation: every bad input names the key, the value and the fix."""

import re

import pytest
from conftest import run_program

from components import settings as settings_module
from components.settings import SettingsError, load_settings

AZURE = {"target": "azure"}
REGION = "westeurope"


def problems_for(**raw):
    with pytest.raises(SettingsError) as raised:
        load_settings({**AZURE, **raw}, location=REGION)
    return raised.value.problems


def assert_one_problem(raw, key, shown_value, fix):
    problems = problems_for(**raw)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.startswith(f"chroma-infra:{key} = {shown_value}"), problem
    assert "Fix:" in problem, problem
    assert re.search(fix, problem), problem


def test_defaults_come_from_pulumi_yaml():
    loaded = load_settings(AZURE, location=REGION)
    declared = settings_module.declarations()
    assert loaded.vm_size == declared["vmSize"]["default"]
    assert loaded.chroma_version == declared["chromaVersion"]["default"]
    assert loaded.data_disk_size_gb == declared["dataDiskSizeGb"]["default"]
    assert loaded.allowed_cidrs == tuple(declared["allowedCidrs"]["default"])
    assert loaded.auth_token is None
    assert loaded.otel is None
    assert loaded.ssh_allowed_cidrs == ()
    assert loaded.data_disk_sku == "Premium_LRS"


def test_values_arrive_as_the_cli_sends_them():
    loaded = load_settings(
        {
            **AZURE,
            "dataDiskSizeGb": "128",
            "protectDataDisk": "false",
            "sshAllowedCidrs": '["198.51.100.7/32"]',
            "otelHeaders": '{"x-honeycomb-team": "abc", "x-dataset": "chroma"}',
            "otelEndpoint": "https://api.honeycomb.io:443",
        },
        location=REGION,
    )
    assert loaded.data_disk_size_gb == 128
    assert loaded.protect_data_disk is False
    assert loaded.ssh_allowed_cidrs == ("198.51.100.7/32",)
    assert loaded.otel_headers == "x-honeycomb-team=abc,x-dataset=chroma"


def test_otel_headers_string_form_is_kept():
    loaded = load_settings({**AZURE, "otelHeaders": "a=1, b=2"}, location=REGION)
    assert loaded.otel_headers == "a=1,b=2"


@pytest.mark.parametrize(
    ("vm_size", "fix"),
    [
        ("Standard_B1s", r"has 1 GiB of RAM; .* need 2\.0 GiB.*smallest that fit are Standard_B1ms \(2 GiB\)"),
        ("Standard_B1ls", r"has 0\.5 GiB"),
    ],
)
def test_vm_size_below_chromas_floor(vm_size, fix):
    assert_one_problem({"vmSize": vm_size}, "vmSize", repr(vm_size), fix)


def test_vm_size_too_small_for_the_expected_collection():
    assert_one_problem(
        {"vmSize": "Standard_B2s", "expectedEmbeddings": "3000000"},
        "vmSize",
        "'Standard_B2s'",
        r"has 4 GiB of RAM; 3,000,000 embeddings of 1024 dimensions need 12\.4 GiB.*holds about 786,432\."
        r".*Standard_B4ms \(16 GiB\)",
    )


def test_unknown_vm_size_lists_near_matches():
    assert_one_problem({"vmSize": "Standard_D2s_v4"}, "vmSize", "'Standard_D2s_v4'", r"Did you mean .*Standard_D2s_v5")


def test_unknown_vm_size_with_memory_override_is_accepted():
    loaded = load_settings({**AZURE, "vmSize": "Standard_L8s_v3", "vmMemoryGib": "64"}, location=REGION)
    assert loaded.vm_memory_gib == 64


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("expectedEmbeddings", "-5"),
        ("expectedEmbeddings", "1.5"),
        ("embeddingDimensions", "0"),
        ("embeddingDimensions", "lots"),
        ("vmMemoryGib", "-8"),
        ("dataDiskSizeGb", "3"),
        ("dataDiskSizeGb", "32768"),
        ("dataDiskSizeGb", "64.5"),
    ],
)
def test_bad_numbers(key, value):
    assert_one_problem({key: value}, key, repr(value), r"whole number")


@pytest.mark.parametrize("token", ["short-token", "has spaces in the token!", 'quote"in-a-token-0123456789', "é" * 20])
def test_bad_auth_token_is_refused_without_showing_it(token):
    problems = problems_for(authToken=token)
    assert len(problems) == 1
    assert problems[0].startswith("chroma-infra:authToken = [secret]: ")
    assert "token68" in problems[0]
    assert "Fix:" in problems[0]
    assert token not in problems[0]


def test_plaintext_secret_in_the_stack_file_is_refused():
    with pytest.raises(SettingsError) as raised:
        load_settings({**AZURE, "authToken": "a" * 32}, location=REGION, encrypted=frozenset())
    (problem,) = raised.value.problems
    assert "plain text" in problem
    assert "--secret authToken" in problem
    assert "a" * 32 not in problem


def test_auth_header_must_be_one_the_client_sends():
    assert_one_problem({"authHeader": "X-Api-Key"}, "authHeader", "'X-Api-Key'", r"Authorization or X-Chroma-Token")


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("allowedCidrs", '["10.0.0.0/33"]', r"not a CIDR"),
        ("allowedCidrs", '["10.0.0.1/24"]', r"Did you mean 10\.0\.0\.0/24"),
        ("sshAllowedCidrs", '["my-laptop"]', r"not a CIDR"),
    ],
)
def test_malformed_cidr(key, value, fix):
    entry = value.strip('[]"')
    assert_one_problem({key: value}, key, repr(entry), fix)


def test_cidr_list_that_is_not_a_list():
    assert_one_problem({"allowedCidrs": "10.0.0.0/8"}, "allowedCidrs", "'10.0.0.0/8'", r"list of strings")


@pytest.mark.parametrize(
    "endpoint", ["collector:4317", "http://collector", "grpc://collector:4317", "http://collector:4317/v1/traces"]
)
def test_otel_endpoint_must_be_http_host_port(endpoint):
    assert_one_problem({"otelEndpoint": endpoint}, "otelEndpoint", repr(endpoint), r"http\(s\)://host:port")


@pytest.mark.parametrize("headers", ["no-equals-sign", "a=1,=2", "{not json", "bad header=1", "a="])
def test_unparsable_otel_headers(headers):
    problems = problems_for(otelHeaders=headers)
    assert len(problems) == 1
    assert problems[0].startswith("chroma-infra:otelHeaders = [secret]: ")
    assert "k=v,k2=v2" in problems[0]


@pytest.mark.parametrize("label", ["My-Chroma", "ab", "1chroma", "chroma-", "a" * 64, "chroma_db"])
def test_dns_label_must_follow_azures_rule(label):
    assert_one_problem({"dnsLabel": label}, "dnsLabel", repr(label), r"3-63 lowercase")


@pytest.mark.parametrize("version", ["latest", "1.5", "v1.5.9", "1.5.x", "0.6.3"])
def test_chroma_version_must_be_a_1x_tag(version):
    shown = repr(version.strip())
    assert_one_problem({"chromaVersion": version}, "chromaVersion", shown, r"(version tag|1\.0\.0 or later)")


def test_granularity_none_turns_tracing_off_and_unknown_values_are_refused():
    traced = {**AZURE, "otelEndpoint": "http://collector.example.com:4317"}
    assert load_settings(traced, REGION).otel is not None
    assert load_settings({**traced, "otelGranularity": "none"}, REGION).otel is None
    assert load_settings({**traced, "otelGranularity": "operation"}, REGION).otel.granularity == "operation"
    assert_one_problem({"otelGranularity": "segment"}, "otelGranularity", "'segment'", r"operation_and_segment")


@pytest.mark.parametrize("name", ["root", "admin", "Chroma", "9lives", "a" * 33])
def test_admin_username_follows_azure_and_linux_rules(name):
    assert_one_problem({"adminUsername": name}, "adminUsername", repr(name), r"azureuser")


def test_premium_disk_on_a_size_without_premium_storage():
    problems = problems_for(vmSize="Standard_L8_v3", vmMemoryGib="64", dataDiskSku="Premium_LRS")
    assert len(problems) == 1
    assert "premium storage" in problems[0]
    assert "StandardSSD_LRS" in problems[0]


def test_default_disk_sku_follows_premium_support():
    loaded = load_settings({**AZURE, "vmSize": "Standard_L8_v3", "vmMemoryGib": "64"}, location=REGION)
    assert loaded.data_disk_sku == "StandardSSD_LRS"


@pytest.mark.parametrize(("key", "value"), [("sshPublicKey", "not-a-key"), ("acmeEmail", "ops-at-example")])
def test_bad_ssh_key_and_email(key, value):
    assert_one_problem({key: value}, key, repr(value), r"pulumi config set")


def test_unknown_key_is_reported_as_a_typo():
    problems = problems_for(vmsize="Standard_D2s_v5")
    assert len(problems) == 1
    assert "chroma-infra:vmsize is not a setting" in problems[0]


def test_target_and_region_are_required():
    with pytest.raises(SettingsError) as raised:
        load_settings({"target": "gcp"}, location=None)
    assert any(problem.startswith("chroma-infra:target = 'gcp'") for problem in raised.value.problems)
    with pytest.raises(SettingsError) as raised:
        load_settings(AZURE, location=None)
    assert "azure-native:location is not set" in str(raised.value)


def test_every_problem_is_reported_at_once():
    problems = problems_for(vmSize="Standard_B1s", authHeader="X-Key", dataDiskSizeGb="1", dnsLabel="UPPER")
    assert {problem.split(" = ")[0] for problem in problems} == {
        "chroma-infra:vmSize",
        "chroma-infra:authHeader",
        "chroma-infra:dataDiskSizeGb",
        "chroma-infra:dnsLabel",
    }


def test_secrets_stay_out_of_repr():
    loaded = load_settings({**AZURE, "authToken": "S3cretToken-0123456789", "otelHeaders": "k=hidden-value"}, REGION)
    assert "S3cretToken" not in repr(loaded)
    assert "hidden-value" not in repr(loaded)


def test_bad_config_fails_the_real_program_before_any_resource():
    with pytest.raises(SettingsError) as raised:
        run_program("dev", {"vmSize": "Standard_B1s", "authToken": "tiny"}, secrets=("authToken",))
    message = str(raised.value)
    assert "chroma-infra:vmSize = 'Standard_B1s'" in message
    assert "chroma-infra:authToken = [secret]" in message
    assert "tiny" not in message
