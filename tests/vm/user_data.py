"""The guest's user-data: the project's rendered cloud-config, with the two ACME lines the test adds.

The only change is to the Caddyfile's global options: the ACME directory becomes pebble's, and
Caddy trusts the CA of pebble's listener. `differences` proves that nothing else changed.
"""

from __future__ import annotations

import yaml
from vm_fixtures import ACME_EMAIL, FQDN, TOKEN, pinned_chroma_version

from components import cloud_config
from components.runtime import AUTHORIZATION

CADDY_TRUST_PATH = "/etc/ssl/certs/chroma-vm-test-acme-listener.pem"


def acme_lines(directory_url: str) -> list[str]:
    """The lines the test adds to the Caddyfile's global options block."""
    return [f"acme_ca {directory_url}", f"acme_ca_root {CADDY_TRUST_PATH}"]


def with_test_acme(rendered: str, directory_url: str) -> str:
    """The rendered cloud-config with the ACME lines added, as text (nothing else re-emitted).

    The Caddyfile holds tabs, so it is a double-quoted YAML scalar: the lines go in escaped, right
    after the `{` that opens its global options block.
    """
    lines = rendered.splitlines(keepends=True)
    path_line = next(i for i, line in enumerate(lines) if line.strip() == f"- path: {cloud_config.CADDYFILE}")
    content = lines[path_line + 1]
    opening = 'content: "{\\n'
    if opening not in content:
        raise AssertionError(f"the Caddyfile no longer starts with its global options block: {content[:60]!r}")
    added = "".join(f"\\t{line}\\n" for line in acme_lines(directory_url))
    lines[path_line + 1] = content.replace(opening, opening + added, 1)
    return "".join(lines)


def differences(original: str, changed: str) -> list[str]:
    """What differs between two cloud-configs, as the lines added to or removed from any file."""
    before, after = yaml.safe_load(original), yaml.safe_load(changed)
    found = [key for key in before.keys() | after.keys() if key != "write_files" and before.get(key) != after.get(key)]
    old_files, new_files = cloud_config.write_files(original), cloud_config.write_files(changed)
    for path in old_files.keys() | new_files.keys():
        old_lines = old_files.get(path, "").splitlines()
        new_lines = new_files.get(path, "").splitlines()
        found += [f"{path}: -{line.strip()}" for line in old_lines if line not in new_lines]
        found += [f"{path}: +{line.strip()}" for line in new_lines if line not in old_lines]
    return sorted(found)


def rendered() -> str:
    """The project's cloud-config for the test FQDN and token, exactly as the VM component renders it."""
    return cloud_config.render_cloud_config(
        fqdn=FQDN,
        chroma_version=pinned_chroma_version(),
        auth_header=AUTHORIZATION,
        token=TOKEN,
        otel=None,
        acme_email=ACME_EMAIL,
    )


def for_guest(directory_url: str) -> str:
    """The guest's user-data: the rendered cloud-config, with only the test's two ACME lines added."""
    original = rendered()
    changed = with_test_acme(original, directory_url)
    expected = sorted(f"{cloud_config.CADDYFILE}: +{line}" for line in acme_lines(directory_url))
    if differences(original, changed) != expected:
        raise AssertionError(f"the user-data differs by more than the ACME lines: {differences(original, changed)}")
    return changed
