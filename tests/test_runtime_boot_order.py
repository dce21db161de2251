"""The VM's boot order, checked by systemd's own loader and transaction engine.

No systemd runs as PID 1 here, so nothing boots. `systemd-analyze verify --root=R` is the most
real check available: it starts systemd's manager in test mode over a root R, loads the units the
rendered cloud-config writes (at the paths it writes them), resolves their dependencies as
systemd would at boot, and builds the start transaction for each unit, refusing a unit whose
dependencies or executables are missing. With systemd's debug log it prints each unit's
dependencies and the jobs that starting it installs, and these tests assert on that output.

R is built as the VM would have it, as far as this machine can: every file from write_files, the
host's systemd units (Debian's systemd, standing in for Ubuntu's), and the host's real
/usr/bin/install. Two things come from Ubuntu packages that this machine does not have, and are
stubs: /usr/bin/docker (docker.io, never executed by `verify`) and docker.service (docker.io's unit).

This shows that starting chroma.service pulls in and waits for srv-chroma.mount, which pulls in
and waits for chroma-data-disk.service and the labelled device. By systemd's Requires= plus After=
semantics (documented, not executed here), a failed disk check or a disk that never appears fails
the mount's job, and with it Chroma's: Chroma is never started, on the OS disk or anywhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from vm_fixtures import unit, unit_environment, unit_settings, vm_files

from components import cloud_config

HOST_UNIT_DIR = Path("/lib/systemd/system")
LABEL_DEVICE = cloud_config.DATA_DEVICE_UNIT
UNITS = cloud_config.UNIT_FILES
DOCKER_STUB = "#!/bin/sh\n# Stands in for docker.io's client; systemd-analyze verify never runs it.\nexit 1\n"
DOCKER_UNIT_STUB = "[Unit]\nDescription=Stands in for docker.io's unit\n[Service]\nExecStart=/usr/bin/docker\n"


def rendered_cloud_config() -> str:
    return cloud_config.render_cloud_config()


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); .ci/run installs it")
    if not HOST_UNIT_DIR.is_dir():
        pytest.skip(f"{HOST_UNIT_DIR} is missing, so systemd's own targets cannot be loaded")
    return found


def vm_root(tmp_path: Path, skip: tuple[str, ...] = ()) -> Path:
    """A root holding the VM's rendered files, systemd's units and the two docker.io stubs."""
    root = tmp_path / "root"
    for path, content in vm_files().items():
        if Path(path).name in skip:
            continue
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
    (root / cloud_config.DISK_SCRIPT.lstrip("/")).chmod(0o755)
    shutil.copytree(HOST_UNIT_DIR, root / "lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/install", root / "usr/bin/install")
    if "docker" not in skip:
        (root / "usr/bin/docker").write_text(DOCKER_STUB, encoding="utf-8")
        (root / "usr/bin/docker").chmod(0o755)
        (root / "lib/systemd/system/docker.service").write_text(DOCKER_UNIT_STUB, encoding="utf-8")
    return root


def verify(root: Path, units: tuple[str, ...] = UNITS, debug: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "debug" if debug else "notice", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [systemd_analyze(), "verify", f"--root={root}", *units],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=60,
        check=False,
    )


def dependencies(log: str) -> dict[str, set[tuple[str, str]]]:
    """Unit -> {(kind, other unit)} from the unit dumps in verify's debug log."""
    found: dict[str, set[tuple[str, str]]] = {}
    current = None
    for line in log.splitlines():
        if unit := re.fullmatch(r"\s*-> Unit (\S+):", line):
            current = found.setdefault(unit.group(1), set())
        elif current is not None and (dependency := re.fullmatch(r"\s+(\w+): (\S+) \(origin-.*\)", line)):
            current.add((dependency.group(1), dependency.group(2)))
    return found


def start_jobs(log: str) -> set[str]:
    """Units for which systemd's transaction installed a start job."""
    return set(re.findall(r"^(\S+): Installed new job \S+/start as \d+$", log, re.MULTILINE))


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    result = verify(vm_root(tmp_path_factory.mktemp("vm")), units=(*UNITS, LABEL_DEVICE), debug=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_units_pass_systemd_analyze_verify(tmp_path):
    result = verify(vm_root(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line for line in (result.stdout + result.stderr).splitlines() if "chroma" in line] == []


def test_verify_refuses_the_units_without_what_docker_io_provides(tmp_path):
    """The stubs are what let verify pass: without them it fails, so it really checks them."""
    result = verify(vm_root(tmp_path, skip=("docker",)), units=("chroma.service",))
    assert result.returncode != 0
    assert "docker.service not found" in result.stderr or "/usr/bin/docker is not executable" in result.stderr


def test_mount_unit_name_is_the_one_systemd_derives_from_where(analysis):
    escape = shutil.which("systemd-escape")
    if escape is None:
        pytest.skip("systemd-escape is not installed (apt-get install systemd); .ci/run installs it")
    name = subprocess.run(
        [escape, "--path", "--suffix=mount", cloud_config.DATA_MOUNT], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert name == "srv-chroma.mount"
    assert name in UNITS
    assert cloud_config.CHROMA_DATA_DIR.startswith(cloud_config.DATA_MOUNT + "/")


def test_chroma_requires_and_waits_for_the_data_mount(analysis):
    chroma = dependencies(analysis)["chroma.service"]
    assert {("Requires", "srv-chroma.mount"), ("After", "srv-chroma.mount")} <= chroma
    assert {("Requires", "docker.service"), ("After", "docker.service")} <= chroma


def test_mount_requires_and_waits_for_the_disk_check_and_the_labelled_disk(analysis):
    mount = dependencies(analysis)["srv-chroma.mount"]
    assert {("Requires", "chroma-data-disk.service"), ("After", "chroma-data-disk.service")} <= mount
    assert {("Requires", LABEL_DEVICE), ("After", LABEL_DEVICE)} <= mount


def test_disk_check_runs_before_the_mount(analysis):
    assert ("Before", "srv-chroma.mount") in dependencies(analysis)["chroma-data-disk.service"]


def test_starting_chroma_pulls_in_the_mount_the_disk_check_and_the_disk(analysis):
    jobs = start_jobs(analysis)
    assert {"chroma.service", "srv-chroma.mount", "chroma-data-disk.service", LABEL_DEVICE} <= jobs


def test_without_the_mount_unit_nothing_would_hold_chroma_back(tmp_path):
    """The chain above comes from the shipped mount unit: RequiresMountsFor= alone adds nothing."""
    result = verify(vm_root(tmp_path, skip=("srv-chroma.mount",)), units=("chroma.service",), debug=True)
    log = result.stdout + result.stderr
    assert "chroma.service" in start_jobs(log)
    assert not {"srv-chroma.mount", "chroma-data-disk.service"} & start_jobs(log)


def test_a_missing_disk_does_not_hold_back_the_rest_of_the_boot(analysis):
    """nofail: the mount is not ordered before local-fs.target, so SSH still comes up to debug it."""
    assert ("Before", "local-fs.target") not in dependencies(analysis)["srv-chroma.mount"]
    assert "srv-chroma.mount" in start_jobs(analysis), "chroma.service still pulls the mount in"


def enabled_as_runcmd_does(root: Path) -> None:
    """`systemctl enable` over the root, as the cloud-config's runcmd enables the units at first boot."""
    for command in yaml.safe_load(rendered_cloud_config())["runcmd"]:
        if command[:2] == ["systemctl", "enable"]:
            units = [word for word in command[2:] if not word.startswith("--")]
            subprocess.run(["systemctl", f"--root={root}", "enable", *units], check=True, capture_output=True)


@pytest.fixture(scope="module")
def boot_analysis(tmp_path_factory):
    """multi-user.target's dependencies once runcmd has enabled what it enables."""
    root = vm_root(tmp_path_factory.mktemp("boot"))
    enabled_as_runcmd_does(root)
    result = verify(root, units=("multi-user.target",), debug=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_every_boot_checks_the_disk_but_multi_user_never_waits_for_it(boot_analysis):
    """Without the disk, multi-user (and cloud-final after it) must not sit out the disk check's wait."""
    target = dependencies(boot_analysis)["multi-user.target"]
    assert ("Wants", "chroma-data-disk.service") in target, "the check runs at every boot, to say why in the journal"
    waits_for = {other for kind, other in target if kind == "After"}
    assert not {"chroma-data-disk.service", "chroma.service", "srv-chroma.mount", LABEL_DEVICE} & waits_for
    assert "chroma.service" not in start_jobs(boot_analysis), "the boot itself does not start Chroma"


def test_nothing_enables_chroma_into_a_boot_target():
    """A WantedBy= on chroma.service would order multi-user after it, and so after the disk's wait."""
    assert "Install" not in unit(vm_files(), "chroma.service")


def test_the_disk_appearing_starts_chroma_now_or_later():
    """The udev rule wants chroma.service from the device at the data disk's LUN, in both of Azure's link forms."""
    files = vm_files()
    lun = unit_environment(unit(files, "chroma-data-disk.service"))["DATA_DISK_LUN"]
    rules = [line for line in files[cloud_config.DATA_DISK_UDEV_RULE].splitlines() if line and not line.startswith("#")]
    links = {re.search(r'SYMLINK=="([^"]+)"', rule).group(1) for rule in rules}
    assert links == {f"disk/azure/data/by-lun/{lun}", f"disk/azure/scsi1/lun{lun}"}
    for rule in rules:
        assert 'ACTION=="add|change"' in rule
        assert 'TAG+="systemd"' in rule
        assert 'ENV{SYSTEMD_WANTS}+="chroma.service"' in rule
    # Azure's own rules (WALinuxAgent 66-azure-storage, azure-vm-utils 80-azure-disk) make the links first.
    assert Path(cloud_config.DATA_DISK_UDEV_RULE).name > "80-azure-disk.rules"


def test_first_boot_re_runs_the_udev_rules_after_writing_them():
    """The disk was seen before cloud-init wrote the rule: runcmd reloads the rules and re-triggers block devices."""
    runcmd = yaml.safe_load(rendered_cloud_config())["runcmd"]
    reload_at = runcmd.index(["udevadm", "control", "--reload"])
    trigger_at = runcmd.index(["udevadm", "trigger", "--subsystem-match=block", "--action=add"])
    assert runcmd.index(["systemctl", "daemon-reload"]) < reload_at < trigger_at


def test_the_disk_device_waits_longer_than_the_disk_check(analysis):
    """A device gets 90 s from systemd by default; the disk check may wait longer before it formats."""
    device_dump = analysis.split(f"-> Unit {LABEL_DEVICE}:", 1)[1].split("-> Unit ", 1)[0]
    drop_ins = [line.split("DropIn Path:", 1)[1].strip() for line in device_dump.splitlines() if "DropIn Path:" in line]
    assert any(path.endswith(cloud_config.DEVICE_TIMEOUT_DROP_IN) for path in drop_ins), "systemd loads the drop-in"
    assert "Unknown key" not in analysis
    timeout = int(unit_settings(vm_files()[cloud_config.DEVICE_TIMEOUT_DROP_IN])["Unit"]["JobRunningTimeoutSec"][0])
    disk_check = unit(vm_files(), "chroma-data-disk.service")
    assert timeout > int(unit_environment(disk_check)["DATA_DISK_WAIT_SECONDS"]) + 60


def test_the_disk_starts_chroma_only_once_the_run_command_has_delivered_its_files():
    """At first boot the rule fires before the run command: chroma.service is skipped, and chroma-apply starts it."""
    conditions = unit(vm_files(), "chroma.service")["Unit"]["ConditionPathExists"]
    assert set(conditions) == {cloud_config.COMPOSE_FILE, cloud_config.CADDYFILE}
