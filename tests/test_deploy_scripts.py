"""scripts/up.sh and scripts/down.sh, run for real with stand-in `pulumi` and `docker` executables.

No Pulumi CLI or Docker engine runs here, so the stand-ins log each call and answer as the real
ones would; the tests check the calls, the environment they see, and what the user is told.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

FAKE_PULUMI = r"""#!/usr/bin/env bash
printf '%s|%s|%s\n' "$*" "${PULUMI_BACKEND_URL:-}" "${PULUMI_CONFIG_PASSPHRASE_FILE:-}" >>"$CALLS"
case "$*" in
	"stack output endpoint"*) echo http://127.0.0.1:8000 ;;
	"stack output authHeader"*) echo Authorization ;;
	"stack output dataVolume"*) echo chroma-infra-local-data ;;
	"config get protectDataDisk"*) [[ -n "${PROTECT:-}" ]] && echo "$PROTECT" || exit 1 ;;
esac
"""
FAKE_DOCKER = """#!/usr/bin/env bash
[[ "$1" == info && -n "${DOCKER_DOWN:-}" ]] && exit 1
exit 0
"""


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def checkout(tmp_path):
    """A checkout with the scripts, stack files and requirements, sharing this .venv."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("up.sh", "down.sh"):
        shutil.copy2(ROOT / "scripts" / name, root / "scripts" / name)
    for name in ("Pulumi.yaml", "Pulumi.local.yaml", "Pulumi.dev.yaml", "requirements.txt"):
        shutil.copy2(ROOT / name, root / name)
    (root / ".venv").symlink_to((ROOT / ".venv").resolve())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "pulumi", FAKE_PULUMI)
    executable(bin_dir / "docker", FAKE_DOCKER)
    return root


def run(checkout, script, *args, path_has_pulumi=True, **env):
    bin_dir = checkout.parent / "bin"
    if not path_has_pulumi:
        (bin_dir / "pulumi").unlink()
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("PULUMI_", "DOCKER_", "PROTECT"))
    }
    environment |= {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(checkout / "calls.log"), **env}
    return subprocess.run(
        ["bash", str(checkout / "scripts" / script), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def calls(checkout):
    log = checkout / "calls.log"
    return [line.split("|") for line in log.read_text().splitlines()] if log.exists() else []


def test_up_local_uses_a_file_backend_a_kept_passphrase_and_prints_how_to_connect(checkout):
    result = run(checkout, "up.sh", "local")
    assert result.returncode == 0, result.stderr
    commands = [command for command, _, _ in calls(checkout)]
    assert commands[:2] == ["stack select --create local", "up --stack local --yes"]
    backend, passphrase = {(url, file) for _, url, file in calls(checkout)}.pop()
    assert backend == f"file://{checkout}/.pulumi-state"
    passphrase_file = Path(passphrase)
    assert passphrase_file == checkout / ".pulumi-state" / "passphrase"
    assert stat.S_IMODE(passphrase_file.stat().st_mode) == 0o600
    first = passphrase_file.read_text()
    assert len(first.strip()) >= 32
    assert "Chroma is up at http://127.0.0.1:8000" in result.stdout
    assert "smoke_test.py --stack local" in result.stdout
    assert not any("--show-secrets" in command for command in commands), "the token is never printed"
    assert run(checkout, "up.sh", "local").returncode == 0
    assert passphrase_file.read_text() == first, "the same passphrase decrypts the same stack next time"


def test_up_uses_the_users_own_passphrase_when_set(checkout):
    assert run(checkout, "up.sh", "local", PULUMI_CONFIG_PASSPHRASE="mine").returncode == 0
    assert not (checkout / ".pulumi-state" / "passphrase").exists()


def test_up_dev_leaves_the_backend_to_the_users_login_and_asks_before_changing_azure(checkout):
    assert run(checkout, "up.sh", "dev").returncode == 0
    commands = [command for command, _, _ in calls(checkout)]
    assert "up --stack dev" in commands
    assert not any(command.startswith("up") and "--yes" in command for command in commands)
    assert all(url == "" for _, url, _ in calls(checkout))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path_has_pulumi": False}, "Pulumi CLI is not installed"),
        ({"DOCKER_DOWN": "1"}, "Docker is not running"),
    ],
)
def test_up_stops_before_anything_when_a_prerequisite_is_missing(checkout, kwargs, message):
    result = run(checkout, "up.sh", "local", **kwargs)
    assert result.returncode == 2
    assert message in result.stderr
    assert not [command for command, _, _ in calls(checkout) if not command.startswith("config")]


def test_up_refuses_an_unknown_stack(checkout):
    result = run(checkout, "up.sh", "prod")
    assert result.returncode == 2
    assert "no Pulumi.prod.yaml" in result.stderr


def test_down_local_keeps_the_volume_and_says_how_to_delete_it(checkout):
    result = run(checkout, "down.sh", "local")
    assert result.returncode == 0, result.stderr
    assert "destroy --stack local --yes" in [command for command, _, _ in calls(checkout)]
    assert "Kept Docker volume chroma-infra-local-data" in result.stdout
    assert "docker volume rm chroma-infra-local-data" in result.stdout


def test_down_local_unprotected_says_the_data_is_gone(checkout):
    result = run(checkout, "down.sh", "local", PROTECT="false")
    assert "Deleted everything, including Chroma's data" in result.stdout


def test_down_azure_keeps_the_protected_disk(checkout):
    result = run(checkout, "down.sh", "dev")
    assert result.returncode == 0, result.stderr
    assert "destroy --stack dev --exclude-protected" in [command for command, _, _ in calls(checkout)]
    assert "Kept the data disk" in result.stdout
