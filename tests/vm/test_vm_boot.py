"""The VM booted for real: the project's rendered cloud-config in a QEMU (TCG) guest, judged from outside.

Each guest boots the cloud-config that `render_cloud_config` produces (the bootstrap), passed as
NoCloud user-data. Once cloud-init has finished, the guest gets the runtime config as Azure's agent
would hand it over: the run command of components/runtime_config.py, run as root over SSH, on a new
VM only (a first boot or a replacement); a reboot runs nothing, as Azure re-runs the run command
only when it is re-created, and chroma.service starts from the files the last run left. Each guest
is judged from the host by scripts/smoke_test.py through the forwarded 443. The scenarios run
in order and share guests where the story allows: the first guest is rebooted, then replaced by a
second with a new OS disk and the same data disk; a third boots without a data disk, is shown a
disk holding another filesystem, and is then given a blank one, all without a reboot.

Stand-ins for what only Azure has; nothing else differs:
- **Image.** Ubuntu 24.04 becomes Debian 13 (trixie, built by `mmdebstrap`; tests/vm/guest_image.py),
  booted by QEMU's `-kernel`. docker.io, docker-cli and docker-compose (compose v2) come preinstalled
  from Debian. The Ubuntu names `docker-compose-v2` and `azure-vm-utils` are local packages built with
  `equivs`, in a file: apt repository that is the guest's only apt source, so `package_update` and
  `packages:` run unchanged and offline. systemd-networkd is enabled (Ubuntu's netplan renders to it).
  root logs in with a test key baked into the image (Azure puts the admin key in through its agent).
  The NoCloud seed is a FAT disk labelled CIDATA (Azure: its own data source).
- **Disk links.** A test udev rule in the image links the virtio-scsi disk at LUN 0 as Azure's rules
  do: `/dev/disk/azure/scsi1/lun0` and `/dev/disk/azure/data/by-lun/0`.
- **Registry.** The stand-in images of tests/images.py are preloaded into the image's
  /var/lib/docker under the pinned names (a host dockerd loads them there at build time), so they
  are there before chroma.service starts and compose pulls nothing. The Caddy stand-in gets one
  more file: the CA of pebble's HTTPS listener.
- **Let's Encrypt.** Debian's `pebble` on the host, with `pebble-challtestsrv` answering DNS. The
  guest reaches it at 10.0.2.100:14000 (a QEMU guestfwd). The run command's Caddyfile gains exactly
  two lines in its global options, `acme_ca` and `acme_ca_root` (tests/vm/user_data.py proves
  nothing else changed).
- **Run command agent.** The script `as_guest_script` renders (the parameters as environment
  variables, then the run command's script), piped to `sh -s` over SSH.
- **Network.** QEMU user networking with `restrict=on`: the guest reaches nothing but pebble; the host
  reaches the guest's 22, 80 and 443 through loopback forwards. The smoke test resolves the FQDN to
  127.0.0.1 with `--resolve`.
- **Hardware.** QEMU's software emulation (TCG), 2 vCPUs, 3 GiB. Every time measured here is under
  emulation, on a shared 2-core host: many times slower than a real VM.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import user_data
import yaml
from machine import Forwards, Guest, make_os_disk, make_seed
from vm_fixtures import FQDN, TOKEN, pinned_chroma_version

from components import cloud_config, runtime
from components.runtime import AUTHORIZATION
from scripts import smoke_test

ROOT = Path(__file__).resolve().parents[2]
SMOKE_TEST = ROOT / "scripts" / "smoke_test.py"
DATA_DISK_SIZE = "2G"
BOOT_TIMEOUT_SECONDS = 900
HEALTHY_TIMEOUT_SECONDS = 900
RUN_COMMAND_TIMEOUT_SECONDS = 900
# A missing disk may cost a boot this much more than a reboot with the disk (issue 18, item 6).
NO_DISK_BOOT_MARGIN_SECONDS = 30
COLLECTION = "vm-tier-persistence"
RECORDS = 64


@dataclass
class Story:
    """What the scenarios hand on to each other: guests, disks, and what was seen."""

    workdir: Path
    forwards: Forwards
    data_disk: Path
    guest: Guest | None = None
    filesystem_uuid: str = ""
    certificate: str = ""
    multi_user: dict[str, float] = field(default_factory=dict)
    spare_guests: list[Guest] = field(default_factory=list)


def blank_disk(path: Path) -> Path:
    subprocess.run(["truncate", "-s", DATA_DISK_SIZE, str(path)], check=True)
    return path


def new_vm(story: Story, name: str, acme, guest_image, data_disk: Path | None) -> Guest:
    """A new VM: a new OS disk, a new instance-id, and the disk given (or none), powered on."""
    workdir = story.workdir / name
    workdir.mkdir()
    os_disk, seed = workdir / "os.qcow2", workdir / "seed.img"
    make_os_disk(os_disk, guest_image)
    make_seed(seed, user_data.rendered(), f"iid-{uuid.uuid4()}", "chroma-vm")
    guest = Guest(guest_image, workdir, story.forwards)
    guest.start(os_disk, seed, data_disk)
    print(f"\n{name}: QEMU started (serial log {guest.serial_log})", flush=True)
    return guest


def wait_for_cloud_init(guest: Guest) -> dict:
    """cloud-init's status once it has finished, as JSON."""
    guest.ssh("cloud-init status --wait >/dev/null || true", timeout=BOOT_TIMEOUT_SECONDS)
    return json.loads(guest.ssh("cloud-init status --format json", check=False).stdout)


def run_the_run_command(guest: Guest, acme) -> float:
    """Runs the run command in the guest as Azure's agent would, secrets on stdin; its seconds."""
    started = time.monotonic()
    result = guest.ssh(
        "sh -s",
        check=False,
        timeout=RUN_COMMAND_TIMEOUT_SECONDS,
        stdin=user_data.run_command_script(acme.directory_url),
    )
    assert result.returncode == 0, f"the run command failed:\n{result.stdout}\n{result.stderr}"
    assert f"chroma-apply: running {runtime.chroma_image(pinned_chroma_version())}" in result.stdout, result.stdout
    assert TOKEN not in result.stdout + result.stderr, "the run command printed the token"
    return round(time.monotonic() - started, 1)


def start_the_run_command(guest: Guest, acme) -> None:
    """Starts the run command in the guest and returns at once: with no data disk, its start of Chroma waits."""
    guest.ssh(
        "umask 077 && cat >/run/chroma-run-command.sh"
        " && systemd-run --quiet --unit=chroma-run-command sh /run/chroma-run-command.sh",
        stdin=user_data.run_command_script(acme.directory_url),
    )


def wait_for_chroma(guest: Guest, timeout: float = HEALTHY_TIMEOUT_SECONDS) -> None:
    """Waits for chroma.service to be active (compose `up --wait`: both containers healthy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = guest.ssh("systemctl is-active chroma.service", check=False).stdout.strip()
        if state == "active":
            return
        time.sleep(3)
    journal = guest.ssh("journalctl -b --no-pager -u chroma-data-disk -u srv-chroma.mount -u chroma | tail -40").stdout
    raise AssertionError(f"chroma.service not active within {timeout:.0f}s:\n{journal}")


def boot_phases(guest: Guest) -> dict[str, float]:
    """Seconds from the kernel's start to multi-user, cloud-final's end and chroma.service active."""
    phases = {
        "boot_to_multi_user": guest.monotonic_seconds("multi-user.target"),
        "boot_to_cloud_final": guest.monotonic_seconds("cloud-final.service"),
        "boot_to_healthy": guest.monotonic_seconds("chroma.service"),
    }
    return {name: round(value, 1) for name, value in phases.items() if value is not None}


def unit_journal(guest: Guest, unit: str) -> str:
    return guest.ssh(f"journalctl -b --no-pager -o cat -u {unit}").stdout


def assert_containers_healthy(guest: Guest) -> None:
    """Every service of the rendered compose file runs, and each one with a health check is healthy."""
    compose = yaml.safe_load(user_data.runtime_files().compose)
    names = [f"{compose['name']}-{service}-1" for service in compose["services"]]
    lines = guest.ssh(
        "docker inspect --format '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "
        + " ".join(names)
    ).stdout.splitlines()
    for name, line in zip(names, lines, strict=True):
        service = name.split("-")[1]
        expected = "healthy" if "healthcheck" in compose["services"][service] else ""
        assert line.split(" ", 2) == [f"/{name}", "running", expected], line


def data_mount(guest: Guest) -> tuple[str, str, str]:
    """(source device, label, filesystem UUID) of /srv/chroma, as the guest sees them."""
    source = guest.ssh("findmnt --noheadings --output SOURCE /srv/chroma").stdout.strip()
    lun0 = guest.ssh("readlink -f /dev/disk/azure/scsi1/lun0").stdout.strip()
    assert source == lun0, f"/srv/chroma is {source}, not the LUN 0 disk {lun0}"
    label = guest.ssh(f"blkid -s LABEL -o value {source}").stdout.strip()
    fs_uuid = guest.ssh(f"blkid -s UUID -o value {source}").stdout.strip()
    return source, label, fs_uuid


def pebble_root(acme, story: Story) -> Path:
    path = story.workdir / "pebble-root.pem"
    path.write_text(acme.root_pem(), encoding="utf-8")
    return path


def run_smoke_test(story: Story, acme) -> float:
    """scripts/smoke_test.py from the host against the forwarded 443; every check must pass. Its seconds."""
    endpoint = f"https://{FQDN}:{story.forwards.https}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(SMOKE_TEST), "--endpoint", endpoint, "--ca-cert", str(pebble_root(acme, story)),
         "--resolve", f"{FQDN}:127.0.0.1", "--wait", "300", "--json"],
        env={"CHROMA_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    seconds = time.monotonic() - started
    report = json.loads(result.stdout)
    checks = {check["name"]: check["ok"] for check in report["checks"]}
    assert result.returncode == 0, f"smoke test failed: {result.stdout}\n{result.stderr}"
    assert report["ok"]
    assert checks == dict.fromkeys(smoke_test.CHECKS, True)
    return round(seconds, 1)


def chroma_client(story: Story, acme):
    target = smoke_test.Target(
        scheme="https",
        host=FQDN,
        port=story.forwards.https,
        token=TOKEN,
        auth_header=AUTHORIZATION,
        ca_cert=pebble_root(acme, story),
        source="the VM tier",
    )
    return smoke_test.open_client(target)


def records() -> tuple[list[str], list[list[float]]]:
    ids = [f"record-{index}" for index in range(RECORDS)]
    return ids, [[float(index), float(index % 7), 1.0] for index in range(RECORDS)]


def write_records(story: Story, acme) -> None:
    with smoke_test.resolved(FQDN, "127.0.0.1"):
        collection = chroma_client(story, acme).get_or_create_collection(COLLECTION)
        ids, embeddings = records()
        collection.add(ids=ids, embeddings=embeddings)


def assert_records_intact(story: Story, acme) -> None:
    with smoke_test.resolved(FQDN, "127.0.0.1"):
        collection = chroma_client(story, acme).get_collection(COLLECTION)
        ids, embeddings = records()
        stored = collection.get(ids=ids, include=["embeddings"])
    assert sorted(stored["ids"]) == sorted(ids)
    by_id = dict(zip(stored["ids"], stored["embeddings"], strict=True))
    assert all(list(by_id[key]) == pytest.approx(value) for key, value in zip(ids, embeddings, strict=True))


def served_certificate(story: Story) -> str:
    """The SHA-256 of the certificate the guest's Caddy serves for the FQDN (unverified: whichever it is)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", story.forwards.https), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=FQDN) as tls,
    ):
        return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def print_phases(scenario: str, phases: dict[str, float]) -> None:
    width = max(len(name) for name in phases)
    print(f"\n{scenario}:")
    for name, seconds in phases.items():
        print(f"  {name:<{width}}  {seconds:7.1f} s")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def story(vm_workdir, forwards) -> Iterator[Story]:
    """The scenarios' shared state; every guest it holds is powered off at the end."""
    state = Story(workdir=vm_workdir, forwards=forwards, data_disk=blank_disk(vm_workdir / "data.img"))
    yield state
    for guest in [state.guest, *state.spare_guests]:
        if guest is not None:
            guest.stop()


def test_first_boot_formats_a_blank_disk_and_serves(story, guest, acme, vm_report):
    phases = vm_report.phases("first_boot")
    vm = new_vm(story, "first", acme, guest, story.data_disk)
    story.guest = vm
    vm.wait_for_ssh(BOOT_TIMEOUT_SECONDS)
    status = wait_for_cloud_init(vm)
    assert status["status"] == "done", status
    assert status["errors"] == [], status["errors"]
    assert vm.monotonic_seconds("chroma.service", "ExecMainStartTimestampMonotonic") is None, "no config yet, no start"
    phases["run_command"] = run_the_run_command(vm, acme)
    wait_for_chroma(vm)
    phases["qemu_start_to_healthy"] = round(time.monotonic() - vm.started_at, 1)
    phases.update(boot_phases(vm))

    assert "making an ext4 filesystem labelled chroma-data" in unit_journal(vm, "chroma-data-disk")
    _source, label, story.filesystem_uuid = data_mount(vm)
    assert label == "chroma-data"
    assert_containers_healthy(vm)
    assert vm.ssh("dpkg-query -W -f '${Status}' docker-compose-v2 azure-vm-utils").stdout.count("installed") == 2

    phases["smoke_test"] = run_smoke_test(story, acme)
    write_records(story, acme)
    story.certificate = served_certificate(story)
    assert acme.orders() >= 1, "Caddy got its certificate from pebble"
    print_phases("first boot, blank disk", phases)
    vm_report.passed("first_boot")


def test_reboot_keeps_the_data_and_starts_chroma_by_itself(story, acme, vm_report):
    vm = story.guest
    assert vm is not None, "needs the first boot's guest"
    phases = vm_report.phases("reboot")
    files_before = vm.ssh(f"sha256sum {cloud_config.CADDYFILE} {cloud_config.COMPOSE_FILE}").stdout
    started = time.monotonic()
    vm.reboot(BOOT_TIMEOUT_SECONDS)
    wait_for_chroma(vm)  # no run command: the files of the last run start it
    assert vm.ssh(f"sha256sum {cloud_config.CADDYFILE} {cloud_config.COMPOSE_FILE}").stdout == files_before
    phases["reboot_to_healthy"] = round(time.monotonic() - started, 1)
    phases.update(boot_phases(vm))
    story.multi_user["reboot"] = phases["boot_to_multi_user"]

    assert "already holds Chroma's filesystem" in unit_journal(vm, "chroma-data-disk")
    assert data_mount(vm)[2] == story.filesystem_uuid, "the disk was not reformatted"
    assert_containers_healthy(vm)
    phases["smoke_test"] = run_smoke_test(story, acme)
    assert_records_intact(story, acme)
    print_phases("reboot", phases)
    vm_report.passed("reboot")


def test_replacement_vm_keeps_the_data_and_the_certificate(story, guest, acme, vm_report):
    """A new OS disk and instance-id, the same data disk: also the zone-failover rehearsal (issue 16)."""
    old = story.guest
    assert old is not None, "needs the first guest"
    phases = vm_report.phases("replacement")
    orders_before = acme.orders()
    started = time.monotonic()
    old.stop()
    story.spare_guests.append(old)
    vm = new_vm(story, "replacement", acme, guest, story.data_disk)
    story.guest = vm
    vm.wait_for_ssh(BOOT_TIMEOUT_SECONDS)
    status = wait_for_cloud_init(vm)
    assert status["status"] == "done", status
    assert status["errors"] == [], status
    phases["run_command"] = run_the_run_command(vm, acme)
    wait_for_chroma(vm)
    phases["replace_to_healthy"] = round(time.monotonic() - started, 1)
    phases.update(boot_phases(vm))

    assert "already holds Chroma's filesystem" in unit_journal(vm, "chroma-data-disk")
    assert data_mount(vm)[2] == story.filesystem_uuid, "the data disk kept its filesystem"
    phases["smoke_test"] = run_smoke_test(story, acme)
    assert_records_intact(story, acme)
    assert served_certificate(story) == story.certificate, "Caddy serves the certificate it had"
    assert acme.orders() == orders_before, "the replacement asked pebble for no new certificate"
    print_phases("replacement VM", phases)
    vm_report.passed("replacement")


def assert_no_disk_no_chroma(vm: Guest) -> None:
    """SSH is up, Chroma never started, nothing under /srv/chroma on the OS disk, and the journal says why."""
    assert vm.ssh("systemctl is-active ssh.service").stdout.strip() == "active"
    assert vm.monotonic_seconds("chroma.service", "ExecMainStartTimestampMonotonic") is None, "Chroma never started"
    assert vm.ssh("mountpoint -q /srv/chroma", check=False).returncode != 0
    assert vm.ssh("find /srv/chroma -mindepth 1 2>/dev/null | head -1").stdout == "", "nothing on the OS disk"
    assert "waiting for the data disk at LUN 0" in unit_journal(vm, "chroma-data-disk"), "the journal says why"


def test_no_data_disk_boots_without_waiting_and_writes_nothing(story, guest, acme, vm_report):
    """First boot and a reboot without the disk; the reboot is timed against the reboot with the disk."""
    if story.guest is not None:
        story.guest.stop()
    phases = vm_report.phases("no_data_disk")
    vm = new_vm(story, "no-disk", acme, guest, None)
    story.guest = vm
    vm.wait_for_ssh(BOOT_TIMEOUT_SECONDS)
    status = wait_for_cloud_init(vm)
    assert status["status"] == "done", status
    assert status["errors"] == [], status
    first = boot_phases(vm)
    phases["first_boot_to_multi_user"] = first["boot_to_multi_user"]
    phases["first_boot_to_cloud_final"] = first["boot_to_cloud_final"]
    # Azure runs the run command on the new VM all the same: it writes the files, and its start of
    # Chroma waits for the disk (the reboot below ends it).
    start_the_run_command(vm, acme)
    vm.wait_for(
        f"test -s {cloud_config.COMPOSE_FILE} && test -s {cloud_config.CADDYFILE}", 300, "the run command's files"
    )
    assert_no_disk_no_chroma(vm)

    vm.reboot(BOOT_TIMEOUT_SECONDS)
    vm.wait_for(
        'test -n "$(systemctl show -P ActiveEnterTimestamp cloud-final.service)"',
        BOOT_TIMEOUT_SECONDS,
        "cloud-final after the reboot",
    )
    phases.update(boot_phases(vm))
    print_phases("no data disk", phases)
    assert_no_disk_no_chroma(vm)
    if "reboot" in story.multi_user:
        limit = story.multi_user["reboot"] + NO_DISK_BOOT_MARGIN_SECONDS
        assert phases["boot_to_multi_user"] <= limit, f"multi-user waited for the missing disk (limit {limit:.0f}s)"
    vm_report.passed("no_data_disk")


def test_a_disk_holding_another_filesystem_is_refused_and_untouched(story, vm_report):
    vm = story.guest
    assert vm is not None, "needs the guest without a data disk"
    assert vm.process is not None
    phases = vm_report.phases("foreign_filesystem")
    foreign = story.workdir / "foreign.img"
    content = story.workdir / "foreign-content"
    content.mkdir()
    (content / "backup.txt").write_text("someone else's data\n", encoding="utf-8")
    subprocess.run(["truncate", "-s", "256M", str(foreign)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-L", "backups", "-d", str(content), str(foreign)], check=True)
    before = file_digest(foreign)

    started = time.monotonic()
    vm.attach_data_disk(foreign, "foreign")
    vm.wait_for(
        "journalctl -b -o cat -u chroma-data-disk | grep -q 'Refusing to format it'", 300, "the disk check refuses it"
    )
    phases["attach_to_refused"] = round(time.monotonic() - started, 1)
    assert vm.ssh("systemctl is-active chroma.service", check=False).stdout.strip() != "active"
    assert vm.ssh("mountpoint -q /srv/chroma", check=False).returncode != 0
    assert vm.ssh("blkid -s LABEL -o value /dev/disk/azure/scsi1/lun0").stdout.strip() == "backups"
    vm.detach_data_disk("foreign")
    assert file_digest(foreign) == before, "not one byte of the other disk changed"
    print_phases("disk holding another filesystem", phases)
    vm_report.passed("foreign_filesystem")


def test_hot_attached_disk_starts_chroma_without_a_reboot(story, acme, vm_report):
    vm = story.guest
    assert vm is not None, "needs the guest without a data disk"
    assert vm.process is not None
    phases = vm_report.phases("hot_attach")
    boot_id = vm.boot_id()
    disk = blank_disk(story.workdir / "hot.img")
    started = time.monotonic()
    vm.attach_data_disk(disk, "hot")
    wait_for_chroma(vm)
    phases["attach_to_healthy"] = round(time.monotonic() - started, 1)
    assert vm.boot_id() == boot_id, "no reboot"
    assert data_mount(vm)[1] == "chroma-data"
    assert_containers_healthy(vm)
    phases["smoke_test"] = run_smoke_test(story, acme)
    print_phases("hot-attached data disk", phases)
    vm_report.passed("hot_attach")
