"""What the guest is given: the bootstrap as user-data, and the run command with the test's ACME lines.

The user-data is the project's rendered cloud-config, unchanged (it holds no settings). The run
command is what the Azure component hands Azure's agent, rendered for the test FQDN and token; the
only change is to its Caddyfile's global options: the ACME directory becomes pebble's, and Caddy
trusts the CA of pebble's listener. `differences` proves that nothing else changed.
"""

from __future__ import annotations

from vm_fixtures import ACME_EMAIL, FQDN, TOKEN, pinned_chroma_version

from components import cloud_config, runtime_config
from components.runtime import AUTHORIZATION

CADDY_TRUST_PATH = "/etc/ssl/certs/chroma-vm-test-acme-listener.pem"
# The release before the pin: the version-change scenario moves the running VM to it and back.
OTHER_CHROMA_VERSION = "1.5.8"
GLOBAL_OPTIONS_OPENING = "{\n"


def acme_lines(directory_url: str) -> list[str]:
    """The lines the test adds to the Caddyfile's global options block."""
    return [f"acme_ca {directory_url}", f"acme_ca_root {CADDY_TRUST_PATH}"]


def with_test_acme(caddyfile: str, directory_url: str) -> str:
    """The run command's Caddyfile with the ACME lines added right after the `{` of its global options."""
    if not caddyfile.startswith(GLOBAL_OPTIONS_OPENING):
        raise AssertionError(f"the Caddyfile no longer starts with its global options block: {caddyfile[:60]!r}")
    added = "".join(f"\t{line}\n" for line in acme_lines(directory_url))
    return GLOBAL_OPTIONS_OPENING + added + caddyfile[len(GLOBAL_OPTIONS_OPENING) :]


def differences(original: str, changed: str) -> list[str]:
    """The lines added to or removed from a file, stripped."""
    old_lines, new_lines = original.splitlines(), changed.splitlines()
    found = [f"-{line.strip()}" for line in old_lines if line not in new_lines]
    found += [f"+{line.strip()}" for line in new_lines if line not in old_lines]
    return sorted(found)


def rendered() -> str:
    """The guest's user-data: the project's bootstrap cloud-config, exactly as the VM component renders it."""
    return cloud_config.render_cloud_config()


def runtime_files(chroma_version: str | None = None) -> runtime_config.RuntimeFiles:
    """The run command's files for the test FQDN and token, exactly as the Azure component renders them."""
    return runtime_config.render_runtime_files(
        site=runtime_config.vm_site(FQDN),
        chroma_version=chroma_version or pinned_chroma_version(),
        auth_header=AUTHORIZATION,
        token=TOKEN,
        otel=None,
        acme_email=ACME_EMAIL,
    )


def run_command_script(directory_url: str, chroma_version: str | None = None) -> str:
    """What Azure's agent would run in the guest: the run command, with only the test's two ACME lines added."""
    chroma_version = chroma_version or pinned_chroma_version()
    files = runtime_files(chroma_version)
    caddyfile = with_test_acme(files.caddyfile, directory_url)
    expected = sorted(f"+{line}" for line in acme_lines(directory_url))
    if differences(files.caddyfile, caddyfile) != expected:
        raise AssertionError(
            f"the Caddyfile differs by more than the ACME lines: {differences(files.caddyfile, caddyfile)}"
        )
    changed = runtime_config.RuntimeFiles(caddyfile=caddyfile, compose=files.compose, token=files.token)
    return runtime_config.as_guest_script(runtime_config.run_command_for(changed, chroma_version))
