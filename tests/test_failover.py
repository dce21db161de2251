"""scripts/failover.sh, run for real: a stand-in `pulumi` logs its calls, the real smoke test checks a real pair.

No Pulumi CLI or Azure runs here. The stand-in keeps the stack's `zone` in a file, and its `up`
starts Caddy (the "new VM") after a boot delay, in front of a real `chroma run`; its `stack output`
points the real scripts/smoke_test.py at that Caddy. So the wait for a booting VM, the smoke test
and the measured time are all real; only Azure's part of `pulumi up` is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from live import LOOPBACK, Chroma, caddy_binary, chroma_server, free_port, write_token_file

from components.runtime import AUTHORIZATION, ProxySite, render_caddyfile

TOKEN = "FailoverToken-0123456789abcdefghijklmnop"
BOOT_SECONDS = 2

FAKE_PULUMI = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$CALLS"
case "$*" in
	"config get target --stack dev") echo "${TARGET:-azure}" ;;
	"config get zone --stack dev") [[ -s "$ZONE_FILE" ]] && cat "$ZONE_FILE" || exit 1 ;;
	"config set zone "*" --stack dev") echo "$4" >"$ZONE_FILE" ;;
	"up --stack dev"*)
		sleep "${UP_SECONDS:-0}"
		if [[ -n "${UP_FAILS:-}" ]]; then
			echo "error: the requested VM size is not available in zone $(cat "$ZONE_FILE")" >&2
			exit 255
		fi
		if [[ -n "${CADDYFILE:-}" ]]; then
			(sleep "$BOOT_SECONDS" && exec caddy run --config "$CADDYFILE" --adapter caddyfile) >"$CADDYFILE.log" 2>&1 &
			echo $! >"$CADDYFILE.pid"
		fi
		;;
	"stack output --json --show-secrets --stack dev") printf '%s\n' "$EXPORTS" ;;
	*) echo "stand-in pulumi: unexpected call: $*" >&2; exit 99 ;;
esac
"""


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chroma]:
    with chroma_server(tmp_path_factory.mktemp("chroma"), env={}) as server:
        yield server


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout with the failover script, the real smoke test and what it imports, sharing this .venv."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("failover.sh", "smoke_test.py"):
        shutil.copy2(ROOT / "scripts" / name, root / "scripts" / name)
    shutil.copytree(ROOT / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "cloud-init", root / "cloud-init")
    for name in ("Pulumi.yaml", "Pulumi.dev.yaml", "Pulumi.local.yaml", "requirements.txt"):
        shutil.copy2(ROOT / name, root / name)
    (root / ".venv").symlink_to((ROOT / ".venv").resolve())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pulumi").write_text(FAKE_PULUMI)
    (bin_dir / "pulumi").chmod(0o755)
    return root


@contextlib.contextmanager
def new_vm(checkout: Path, chroma: Chroma) -> Iterator[dict[str, str]]:
    """What the stand-in `up` boots: Caddy with the rendered config on a loopback port, in front of Chroma."""
    port = free_port()
    caddy_dir = checkout.parent / "caddy"
    caddy_dir.mkdir()
    site = ProxySite(
        site_address=f"http://{LOOPBACK}:{port}",
        upstream=f"{LOOPBACK}:{chroma.port}",
        bind_address=LOOPBACK,
        health_port=free_port(),
        token_file=write_token_file(caddy_dir / "token", TOKEN),
    )
    # The stand-in's `up` starts caddy by name; give it the one the other runtime tests use.
    (checkout.parent / "bin" / "caddy").symlink_to(caddy_binary())
    caddyfile = caddy_dir / "Caddyfile"
    caddyfile.write_text(render_caddyfile(site, AUTHORIZATION))
    exports = {"endpoint": f"http://{LOOPBACK}:{port}", "authHeader": AUTHORIZATION, "authToken": TOKEN}
    try:
        yield {
            "CADDYFILE": str(caddyfile),
            "EXPORTS": json.dumps(exports),
            "HOME": str(caddy_dir),
            "XDG_DATA_HOME": str(caddy_dir / "data"),
            "XDG_CONFIG_HOME": str(caddy_dir / "config"),
        }
    finally:
        pid_file = caddyfile.with_name("Caddyfile.pid")
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


def failover(checkout: Path, *args: str, zone: str | None = "1", **env: str) -> subprocess.CompletedProcess[str]:
    zone_file = checkout / "zone"
    zone_file.write_text(f"{zone}\n" if zone else "")
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("PULUMI_", "CHROMA_"))}
    environment |= {
        "PATH": f"{checkout.parent / 'bin'}:{os.environ['PATH']}",
        "CALLS": str(checkout / "calls.log"),
        "ZONE_FILE": str(zone_file),
        "BOOT_SECONDS": str(BOOT_SECONDS),
        **env,
    }
    return subprocess.run(
        ["bash", str(checkout / "scripts" / "failover.sh"), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def calls(checkout: Path) -> list[str]:
    log = checkout / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def stack_zone(checkout: Path) -> str:
    return (checkout / "zone").read_text().strip()


def test_failover_sets_the_zone_deploys_waits_for_the_smoke_test_and_reports_the_time(checkout, chroma):
    with new_vm(checkout, chroma) as vm:
        result = failover(checkout, "dev", "2", "--yes", "--wait", "60", UP_SECONDS="1", **vm)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert calls(checkout) == [
        "config get target --stack dev",
        "config get zone --stack dev",
        "config set zone 2 --stack dev",
        "up --stack dev --yes",
        "stack output --json --show-secrets --stack dev",
    ]
    assert stack_zone(checkout) == "2"
    assert "from zone 1 to zone 2: only the VM is replaced" in result.stdout
    assert "PASS: all checks passed" in result.stdout, "the real smoke test ran against the new VM"
    tries = re.search(r"heartbeat 200 after (\d+) tr", result.stdout)
    assert tries, result.stdout
    assert int(tries[1]) >= 2, "the smoke test waited for the VM to boot"
    total = re.search(r"Recovered in zone 2: (\d+)s from the start of pulumi up to a passing smoke test", output)
    up = re.search(r"  pulumi up +(\d+)s  old VM deleted, new VM created in zone 2", output)
    healthy = re.search(r"  to healthy +(\d+)s  boot, disk mount", output)
    assert total, output
    assert up, output
    assert healthy, output
    assert int(up[1]) >= 1, "pulumi up's time is measured"
    assert int(healthy[1]) >= BOOT_SECONDS, "the boot is part of the time to recover"
    assert int(total[1]) == int(up[1]) + int(healthy[1])
    assert "confirmation" not in output, "with --yes there is no confirmation to wait for"
    assert TOKEN not in output


def test_rerun_with_the_same_zone_resumes_without_setting_it_again(checkout, chroma):
    with new_vm(checkout, chroma) as vm:
        result = failover(checkout, "dev", "2", "--wait", "60", zone="2", **vm)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already set to zone 2: running pulumi up to finish the failover" in result.stdout
    assert not [call for call in calls(checkout) if call.startswith("config set")]
    assert "up --stack dev" in calls(checkout), "without --yes, pulumi up asks before it changes anything"
    assert "includes the time pulumi up waited for your confirmation" in result.stdout


def test_failed_deploy_exits_1_and_says_how_to_resume(checkout):
    result = failover(checkout, "dev", "3", "--yes", UP_FAILS="1")
    assert result.returncode == 1
    assert "not available in zone 3" in result.stderr, "pulumi's own error reaches the operator"
    assert "pulumi up failed after" in result.stderr
    assert "run scripts/failover.sh dev 3 again to resume, or pick another zone" in result.stderr
    assert stack_zone(checkout) == "3"
    assert not [call for call in calls(checkout) if call.startswith("stack output")], "no smoke test after a failed up"


def test_smoke_test_that_never_passes_exits_1(checkout):
    exports = {"endpoint": f"http://{LOOPBACK}:{free_port()}", "authHeader": AUTHORIZATION, "authToken": TOKEN}
    result = failover(checkout, "dev", "2", "--yes", "--wait", "2", EXPORTS=json.dumps(exports))
    assert result.returncode == 1
    assert "FAIL: the reachable check failed" in result.stdout
    assert "the smoke test failed" in result.stderr
    assert "the VM is in zone 2" in result.stderr
    assert "Recovered" not in result.stdout
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "zone", "env", "message"),
    [
        (("dev",), "1", {}, "usage: scripts/failover.sh STACK ZONE"),
        (("dev", "4"), "1", {}, "ZONE must be 1, 2 or 3, not '4'"),
        (("dev", "2", "--force"), "1", {}, "unknown option '--force'"),
        (("dev", "2", "--wait", "soon"), "1", {}, "--wait takes a whole number of seconds"),
        (("prod", "2"), "1", {}, "no Pulumi.prod.yaml"),
        (("dev", "2"), "1", {"TARGET": "local"}, "only an Azure stack has zones"),
        (("dev", "2"), None, {}, "stack dev has no zone"),
    ],
    ids=["no-zone-argument", "bad-zone", "unknown-option", "bad-wait", "unknown-stack", "local-stack", "zone-unset"],
)
def test_refusals_change_nothing(checkout, args, zone, env, message):
    result = failover(checkout, *args, zone=zone, **env)
    assert result.returncode == 2
    assert message in result.stderr
    assert not [call for call in calls(checkout) if not call.startswith("config get")], "nothing was changed"
    assert stack_zone(checkout) == (zone or "")


def test_zone_unset_points_to_the_planned_move_in_readme(checkout):
    result = failover(checkout, "dev", "2", zone=None)
    section = re.search(r"'(Put an existing stack into a zone)'", result.stderr)
    assert section, result.stderr
    assert f"### {section[1]}" in (ROOT / "README.md").read_text(), "the section the error names exists"


def test_without_pulumi_it_says_how_to_install_it(checkout):
    (checkout.parent / "bin" / "pulumi").unlink()
    result = failover(checkout, "dev", "2")
    assert result.returncode == 2
    assert "the Pulumi CLI is not installed" in result.stderr


def test_the_script_is_executable():
    assert (ROOT / "scripts" / "failover.sh").stat().st_mode & stat.S_IXUSR
