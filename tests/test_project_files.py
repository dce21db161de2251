"""Project files agree with each other: Pulumi.yaml, stack files, requirements, README, CI, scripts."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import ROOT

from components.settings import declarations

# Pulumi's project schema, vendored: see tests/schemas/README.md.
SCHEMA = ROOT / "tests" / "schemas" / "pulumi-project.json"
PROJECT_FILE = ROOT / "Pulumi.yaml"
README = ROOT / "README.md"


def project_validator():
    return jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))


def test_pulumi_yaml_matches_pulumis_project_schema():
    errors = [error.message for error in project_validator().iter_errors(yaml.safe_load(PROJECT_FILE.read_text()))]
    assert errors == []


def test_the_schema_check_catches_a_typo_in_a_declaration():
    project = yaml.safe_load(PROJECT_FILE.read_text())
    project["config"]["vmSize"]["defualt"] = project["config"]["vmSize"].pop("default")
    assert list(project_validator().iter_errors(project))


def test_project_runtime_and_name():
    project = yaml.safe_load(PROJECT_FILE.read_text())
    assert project["name"] == "chroma-infra"
    assert project["runtime"]["name"] == "python"
    assert project["runtime"]["options"]["virtualenv"] == ".venv"


def test_every_key_is_declared_with_a_description_and_a_default():
    for key, spec in declarations().items():
        assert spec.get("description"), f"{key} has no description"
        if key != "target":
            assert "default" in spec, f"{key}: the CLI refuses a stack that leaves a key with no default unset"


def test_secret_keys_are_untyped_so_their_empty_default_is_allowed():
    # The CLI copies a default into the stack in plain text and then refuses a typed secret key.
    for key, spec in declarations().items():
        if spec.get("secret"):
            assert "type" not in spec, key


def test_stack_files_set_only_declared_keys():
    for stack_file in ROOT.glob("Pulumi.*.yaml"):
        config = yaml.safe_load(stack_file.read_text()).get("config") or {}
        for key in config:
            namespace, _, name = key.partition(":")
            if namespace == "chroma-infra":
                assert name in declarations(), f"{stack_file.name}: {key} is not declared in Pulumi.yaml"


def test_chroma_version_default_is_the_chromadb_the_tests_run():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE))
    assert declarations()["chromaVersion"]["default"] == pins["chromadb"]


def test_every_requirement_is_pinned():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r "):
                assert re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[0-9][0-9A-Za-z.]*", line), f"{name}: {line} is not pinned"


def readme_config_table():
    rows = {}
    for line in README.read_text().splitlines():
        match = re.match(r"^\| `([A-Za-z]+)` \| (.*?) \| (.*?) \| (.*?) \|$", line)
        if match:
            rows[match.group(1)] = match.group(2, 3, 4)
    return rows


def shown_default(spec):
    """How README's config table shows a declared default."""
    default = spec.get("default")
    if default in (None, "", []):
        return "(unset)" if "default" in spec else "(required)"
    if isinstance(default, list):
        return ", ".join(default)
    return str(default).lower() if isinstance(default, bool) else str(default)


def test_readme_config_table_matches_pulumi_yaml():
    rows = readme_config_table()
    assert set(rows) == set(declarations()), "README's config table lists exactly the declared keys"
    for key, spec in declarations().items():
        default, secret, description = rows[key]
        assert default == f"`{shown_default(spec)}`", f"{key}: README default {default}"
        assert secret == ("yes" if spec.get("secret") else ""), f"{key}: README secret column"
        assert description == spec["description"], f"{key}: README description differs from Pulumi.yaml"


def readme_commands():
    return re.findall(r"^```(?:sh|bash)\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)


def test_ci_runs_the_readme_test_command():
    test_command = "scripts/test.sh"
    assert any(block.strip() == test_command for block in readme_commands()), "README shows the test command alone"
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == test_command, ".ci/run ends with README's test command"


def shell_scripts():
    scripts = [*sorted(ROOT.glob("**/*.sh")), ROOT / ".ci" / "run"]
    return [path for path in scripts if ".venv" not in path.parts]


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda path: str(path.relative_to(ROOT)))
def test_shell_scripts_pass_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); .ci/run installs it")
    result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()


def test_shellcheck_is_not_a_rubber_stamp(tmp_path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); .ci/run installs it")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    assert subprocess.run([shellcheck, str(bad)], capture_output=True).returncode != 0


def test_main_is_a_thin_entry_point():
    assert len(Path(ROOT / "__main__.py").read_text().splitlines()) <= 40


def test_readme_set_up_names_the_script_ci_runs():
    # One list of system tools: README's set-up line, .ci/run and tests.yml all call this script.
    assert "`sudo scripts/install-test-tools.sh`" in README.read_text()
    assert (ROOT / "scripts" / "install-test-tools.sh").stat().st_mode & 0o111, "the script is executable"
