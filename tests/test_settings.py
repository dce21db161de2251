"""Stack config validation: every bad input names the key, the value and the fix."""

import re

import pytest
from conftest import run_program

from components import settings as settings_module
from components import sizing
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
        (
            "Standard_B1s",
            r"has 1 GiB of RAM; .* need 2\.0 GiB \(Chroma's floor is 2 GiB\).*"
            r"Fix: pulumi config set vmSize Standard_F2s_v2\. "
            r"Smallest that fit: Standard_F2s_v2 \(4 GiB, compute optimized\)",
        ),
        ("Standard_B1ls", r"has 0\.5 GiB"),
    ],
)
def test_vm_size_below_chromas_floor(vm_size, fix):
    assert_one_problem({"vmSize": vm_size}, "vmSize", repr(vm_size), fix)


def test_vm_size_too_small_gives_steady_peak_capacity_and_the_sizes_that_fit():
    need = sizing.memory_need(3_000_000, 1024)
    fitting = sizing.smallest_fitting(need.required_gib)
    assert_one_problem(
        {"vmSize": "Standard_B2s", "expectedEmbeddings": "3000000"},
        "vmSize",
        "'Standard_B2s'",
        rf"has 4 GiB of RAM; 3,000,000 embeddings of 1024 dimensions need {need.required_gib:.1f} GiB: "
        rf"Chroma takes {need.steady_gib:.1f} GiB at rest and {need.peak_gib:.1f} GiB while loading, "
        rf"plus 1 GiB for the OS, Docker and Caddy\. "
        rf"It holds about {sizing.max_embeddings(4, 1024):,} of them\. "
        rf"Fix: pulumi config set vmSize {fitting[0]}\. Smallest that fit: {fitting[0]} .*"
        r"burstable sizes come last, as they throttle once their CPU credits run out\.",
    )


# Accepted under Chroma's published rule (4 B x dims + 1 GiB, and no disk check), rejected by the measured model.
OLD_RULE_ACCEPTED = [
    (
        {
            "vmSize": "Standard_D4s_v5",
            "expectedEmbeddings": "10000000",
            "embeddingDimensions": "384",
            "dataDiskSizeGb": "256",
        },
        "vmSize",
    ),
    ({"vmSize": "Standard_D2s_v5", "expectedEmbeddings": "1700000", "embeddingDimensions": "1024"}, "vmSize"),
    ({"vmSize": "Standard_E16s_v5", "expectedEmbeddings": "10000000", "embeddingDimensions": "1536"}, "dataDiskSizeGb"),
]


@pytest.mark.parametrize(("raw", "key"), OLD_RULE_ACCEPTED, ids=["10M-384d-16GiB", "1.7M-1024d-8GiB", "10M-1536d-64GB"])
def test_configs_the_published_rule_accepted_are_rejected(raw, key):
    memory = sizing.VM_MEMORY_GIB[raw["vmSize"]]
    embeddings, dimensions = int(raw["expectedEmbeddings"]), int(raw["embeddingDimensions"])
    assert sizing.published_rule_memory_gib(embeddings, dimensions) <= memory, "the published rule accepted it"
    problems = problems_for(**raw)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"chroma-infra:{key} = "), problems[0]
    assert "Fix: pulumi config set " + key in problems[0], problems[0]


def test_data_disk_too_small_names_the_key_the_need_and_the_tier():
    need = sizing.disk_need(10_000_000, 1536)
    tier = sizing.disk_tier_at_least(need.required_gb)
    assert_one_problem(
        {"vmSize": "Standard_E16s_v5", "expectedEmbeddings": "10000000", "embeddingDimensions": "1536"},
        "dataDiskSizeGb",
        "64",
        rf"is too small for 10,000,000 embeddings of 1536 dimensions: they need {need.required_gb:,} GB "
        rf"\({need.index_gib:,.1f} GB of index, {need.growth_gib:,.1f} GB for its next growth step and "
        rf"{need.repair_gib:,.1f} GB for a copy a repair moves aside, {need.write_log_gib:,.1f} GB of kept write log, "
        rf"64 MB for Caddy, over the 92% of a disk ext4 leaves "
        rf"usable\)\. It holds about {sizing.max_embeddings_on_disk(64, 1536):,} of them\. "
        rf"Fix: pulumi config set dataDiskSizeGb {tier} \(disks bill by tier",
    )


def test_a_disk_that_holds_the_data_is_accepted():
    need = sizing.disk_need(10_000_000, 1536)
    raw = {"vmSize": "Standard_E16s_v5", "expectedEmbeddings": "10000000", "embeddingDimensions": "1536"}
    loaded = load_settings({**AZURE, **raw, "dataDiskSizeGb": str(need.required_gb)}, location=REGION)
    assert loaded.data_disk_size_gb == need.required_gb


def test_past_the_largest_size_and_disk_the_message_says_one_node_is_the_limit():
    problems = problems_for(vmSize="Standard_E192is_v6", expectedEmbeddings="2000000000", embeddingDimensions="3072")
    assert [problem.split(" = ")[0] for problem in problems] == ["chroma-infra:vmSize", "chroma-infra:dataDiskSizeGb"]
    for problem in problems:
        assert "Nothing here fits" in problem, problem
        assert "One Chroma node is the limit of this stack" in problem, problem
        assert "distributed Chroma" in problem, problem
    required = sizing.memory_need(2_000_000_000, 3072).required_gib
    expected = f"no size in the catalog has {required:,.0f} GiB (the largest, Standard_E192is_v6, has 1832 GiB;"
    assert expected in problems[0]
    assert "the largest managed disk is 32,767 GB" in problems[1]


def test_the_local_target_has_no_vm_or_disk_to_size():
    loaded = load_settings({"target": "local", "expectedEmbeddings": "50000000", "dataDiskSizeGb": "4"})
    assert loaded.expected_embeddings == 50_000_000


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


# --- Values that pass a shape check but break the VM or lock the user out ----------------------

# Real public keys, made with ssh-keygen for these tests (public keys are not secrets).
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE+eW+eW5ykAzr6dFSbUuu7FRUzcJ9I5DLSOIqkng4oK test@example"
ECDSA_256 = (
    "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEeY7fgkLs272+FXJM6N3OZaBK5N"
    "t8mxxUN7cl8c4Xnq"
    "m44NLlCvWtRsv5p57tXSkHBrXmgqVWfSq3vcPMXNc7c= test@example"
)
RSA_2048 = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQDAtZ9CnUlpb8QryPqF527Q9wm4OKSzmXPUTxmiTbkGA8onQejFkozMzAIEU7sf"
    "DawaiI1ev91hzNUl"
    "4aQhuRrrly/G2qO4AoIH2jT6EeFRW+6U2S0uiW2xxTcOHhCfe/+ejILCl9gkCRKFOkEgdeBCuni9xXPYPSNK+wc3i2y2eiCuUkBX"
    "2+gGikrhEhtPXR33"
    "ZewjUbANu3bGnWcgx2ROM5F0Ga3hhSJlR+OHyIjQb0LWqpaW6i0riZf0HkVdI6DiTWEQq89PSQ6Wtm7dumXuiB2b8LEPcL7kDoAt"
    "e0GJIXSsgC5DJ/OP"
    "M8xYIR4cftqcoBA8ZgGubXzA86jxY4Wn test@example"
)
RSA_1024 = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDC6baFO9yEPK7HCSuK1j4vtkwjsyIb0lnimNIBpxpk51SKIqqGWI5oPammPT97"
    "FMjuNIlDC0eeZbmI"
    "pU+yc8CLQBCURAo0UmpFTU7HE+aklPndv0sHr2ZEfGu8YcCxbRC2bRdBJbLspqvnZMXSosVfT3hYTFJVpOwxVBpON5ZByw== test@example"
)
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACBPnlvnlucpAM6+nRUm1LruxUVM3CfSOQy0jiKpJ4OKCgAAAJhOotHITqLR\n-----END OPENSSH PRIVATE KEY-----"
)


@pytest.mark.parametrize("key", [ED25519, ECDSA_256, RSA_2048], ids=["ed25519", "ecdsa", "rsa-2048"])
def test_valid_ssh_keys_are_accepted(key):
    assert load_settings({**AZURE, "sshPublicKey": key}, location=REGION).ssh_public_key == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (RSA_1024, "it is a 1024-bit RSA key, and Azure needs at least 2048 bits"),
        (ED25519.replace("AAAAIE+eW", "AAAAIE+e!W"), "is not an OpenSSH public key"),
        (ED25519.replace("AAAAIE+eW+eW5", "AAAAIE+eW+e"), "its base64 part does not decode"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIConfiguredKey user@laptop", "its base64 part does not decode"),
        ("ssh-rsa " + ED25519.split()[1], "its key data is not a ssh-rsa key"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAEAAAAAAAAAAAAAAAAAAAAAA=", "its ed25519 key data does not parse"),
    ],
    ids=["rsa-1024", "bad-character", "broken-base64", "made-up-blob", "type-mismatch", "short-ed25519"],
)
def test_ssh_keys_azure_or_sshd_would_refuse(key, reason):
    problems = problems_for(sshPublicKey=key)
    assert len(problems) == 1, problems
    assert problems[0].startswith("chroma-infra:sshPublicKey = "), problems[0]
    assert reason in problems[0]
    assert "Fix: pulumi config set sshPublicKey" in problems[0]


def test_a_pasted_private_key_is_refused_and_never_echoed():
    problems = problems_for(sshPublicKey=PRIVATE_KEY)
    assert len(problems) == 1, problems
    assert problems[0].startswith("chroma-infra:sshPublicKey = [not shown]: is a private key"), problems[0]
    for line in PRIVATE_KEY.splitlines()[1:-1]:
        assert line[:12] not in problems[0], "part of the private key was echoed"


@pytest.mark.parametrize("email", ["ops@example.com", "ops+chroma@example.com", "first.last@mail.example.co.uk"])
def test_valid_acme_emails_are_accepted(email):
    assert load_settings({**AZURE, "acmeEmail": email}, location=REGION).acme_email == email


@pytest.mark.parametrize(
    "email", ['ops"@example.com', "ops\\@example.com", "{$HOME}@example.com", "ops@{$HOST}.com", "o ps@example.com"]
)
def test_acme_email_that_would_break_the_caddyfile_is_refused(email):
    assert_one_problem({"acmeEmail": email}, "acmeEmail", repr(email), r"not an email address")


@pytest.mark.parametrize("key", ["allowedCidrs", "sshAllowedCidrs"])
def test_ipv6_ranges_are_refused_because_the_vm_is_ipv4_only(key):
    problems = problems_for(**{key: ["2001:db8::/32"]})
    assert any(
        problem.startswith(f"chroma-infra:{key} = '2001:db8::/32': is an IPv6 range, but the VM has only an IPv4")
        for problem in problems
    ), problems
    loaded = load_settings({**AZURE, key: ["203.0.113.0/24"]}, location=REGION)
    assert getattr(loaded, "allowed_cidrs" if key == "allowedCidrs" else "ssh_allowed_cidrs") == ("203.0.113.0/24",)


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://user:s3cr3tpw@collector.example.com:4317",
        "http://collector.example.com:4317?token=abc",
        "http://collector.example.com:4317#frag",
        "http://collector.example.com:4317/?x",
    ],
    ids=["userinfo", "query", "fragment", "slash-query"],
)
def test_otel_endpoint_with_credentials_query_or_fragment_is_refused(endpoint):
    problems = problems_for(otelEndpoint=endpoint)
    assert len(problems) == 1, problems
    assert problems[0].startswith("chroma-infra:otelEndpoint = "), problems[0]
    assert "no path, user, password, query or fragment" in problems[0]
    assert "s3cr3tpw" not in problems[0], "a password in the URL is not echoed"


@pytest.mark.parametrize("name", ["   ", "\t", "chroma\nprod"], ids=["spaces", "tab", "newline"])
def test_blank_or_unprintable_service_name_is_refused(name):
    problems = problems_for(otelServiceName=name)
    assert len(problems) == 1, problems
    assert problems[0].startswith("chroma-infra:otelServiceName = "), problems[0]
    assert "non-blank name of printable ASCII" in problems[0]


@pytest.mark.parametrize("value", ["1e400", "inf", "-inf", "nan", "1e309"])
@pytest.mark.parametrize("key", ["dataDiskSizeGb", "expectedEmbeddings", "hostPort", "vmMemoryGib"])
def test_huge_or_infinite_numbers_name_the_key_instead_of_crashing(key, value):
    problems = problems_for(**{key: value})
    assert any(problem.startswith(f"chroma-infra:{key} = {value!r}: must be a whole number") for problem in problems)


def test_auth_token_is_capped_at_1024_characters():
    assert load_settings({**AZURE, "authToken": "a" * 1024}, location=REGION).auth_token == "a" * 1024
    problems = problems_for(authToken="a" * 1025)
    assert len(problems) == 1, problems
    assert problems[0].startswith("chroma-infra:authToken = [secret]: has 1025 characters; it needs 16 to 1024")
    assert "a" * 20 not in problems[0]


def test_otel_header_values_are_percent_encoded():
    loaded = load_settings({**AZURE, "otelHeaders": {"x-key": "a%b,c=d e"}}, location=REGION)
    assert loaded.otel_headers == "x-key=a%25b%2Cc%3Dd%20e"
    assert load_settings({**AZURE, "otelHeaders": "x-key=a%b"}, location=REGION).otel_headers == "x-key=a%25b"


def test_unprintable_otel_header_value_is_refused():
    problems = problems_for(otelHeaders={"x-key": "caf\u00e9"})
    assert len(problems) == 1, problems
    assert problems[0].startswith("chroma-infra:otelHeaders = [secret]: entry 1"), problems[0]


def test_new_checks_stop_the_real_program_before_any_resource():
    with pytest.raises(SettingsError) as raised:
        run_program(
            "dev",
            {"sshPublicKey": PRIVATE_KEY, "allowedCidrs": ["2001:db8::/32"], "dataDiskSizeGb": "1e400"},
        )
    message = str(raised.value)
    for key in ("sshPublicKey", "allowedCidrs", "dataDiskSizeGb"):
        assert f"chroma-infra:{key} = " in message
    assert "b3BlbnNzaC1rZXkt" not in message, "the private key was echoed"
