"""The VM booted for real: the project's rendered cloud-config in a QEMU (TCG) guest, judged from outside.

Each guest boots the cloud-config that `render_cloud_config` produces (the bootstrap), passed as
NoCloud user-data. Once cloud-init has finished, the guest gets the runtime config as Azure's agent
would hand it over: the run command of components/runtime_config.py, run as root over SSH, on a new
VM only (a first boot or a replacement); a reboot runs nothing, as Azure re-runs the run command
only when it is re-created, and chroma.service starts from the files the last run left. Each guest
is judged from the host by scripts/smoke_test.py through the forwarded 443. The scenarios run
in order and share guests where the story allows: the first guest is rebooted, then replaced by a
second with a new OS disk and the same data disk. A copy of that disk, taken while a client writes,
is restored onto a third (README's restore runbook), which then changes its Chroma version and back.
A fourth boots without a data disk, is shown a disk holding another filesystem, and is then given a
blank one, all without a reboot.

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
  are there before chroma.service starts and compose pulls nothing. So is the Chroma stand-in of
  the previous release, which the version change finds as a pull would leave it. The Caddy
  stand-in gets one more file: the CA of pebble's HTTPS listener.
- **Disk snapshot.** A snapshot (or an Azure Backup recovery point) of the running data disk is
  QEMU's `blockdev-backup` of it, a point-in-time copy of what the guest had written to the disk;
  restoring it (`dataDiskSourceId`) is a new VM booted with that copy as its data disk.
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

import contextlib
import hashlib
import io
import json
import math
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import user_data
import yaml
from live import down_seconds
from machine import Forwards, Guest, make_os_disk, make_seed
from vm_fixtures import FQDN, TOKEN, pinned_chroma_version

from components import cloud_config, runtime
from components.runtime import AUTHORIZATION
from scripts import chroma_data, smoke_test

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
# The restore scenario's writer: batches of this many records of this many dimensions.
WRITER_COLLECTION = "vm-tier-restore"
WRITER_BATCH = 25
WRITER_DIMENSIONS = 16
# Chroma persists an index every sync_threshold records (1,000 by default): a low one, as in the
# crash tier, has the copy catch index files mid-rewrite, not an index that was never persisted.
WRITER_CONFIGURATION = {"hnsw": {"sync_threshold": 60, "batch_size": 30}}
# Batches acknowledged before the copy is taken, and after it (writes in flight while it runs).
BATCHES_BEFORE_COPY = 8
BATCHES_AFTER_COPY = 4


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


def run_the_run_command(guest: Guest, acme, chroma_version: str | None = None) -> tuple[float, str]:
    """Runs the run command in the guest as Azure's agent would, secrets on stdin; (its seconds, its output)."""
    chroma_version = chroma_version or pinned_chroma_version()
    started = time.monotonic()
    result = guest.ssh(
        "sh -s",
        check=False,
        timeout=RUN_COMMAND_TIMEOUT_SECONDS,
        stdin=user_data.run_command_script(acme.directory_url, chroma_version),
    )
    assert result.returncode == 0, f"the run command failed:\n{result.stdout}\n{result.stderr}"
    assert f"chroma-apply: running {runtime.chroma_image(chroma_version)}" in result.stdout, result.stdout
    assert TOKEN not in result.stdout + result.stderr, "the run command printed the token"
    return round(time.monotonic() - started, 1), result.stdout


def start_the_run_command(guest: Guest, acme) -> None:
    """Starts the run command in the guest and returns at once: with no data disk, its start of Chroma waits."""
    guest.ssh(
        "umask 077 && cat >/run/chroma-run-command.sh"
        " && systemd-run --quiet --unit=chroma-run-command sh /run/chroma-run-command.sh",
        stdin=user_data.run_command_script(acme.directory_url),
    )


def replace_vm(story: Story, name: str, acme, guest_image, data_disk: Path, phases: dict) -> tuple[Guest, float]:
    """Powers the story's guest off and brings up a new VM on `data_disk`, up to healthy; (it, seconds taken).

    As Azure does for a new VM: cloud-init's bootstrap, then the run command (its seconds go in `phases`).
    """
    started = time.monotonic()
    if story.guest is not None:
        story.guest.stop()
        story.spare_guests.append(story.guest)
    vm = new_vm(story, name, acme, guest_image, data_disk)
    story.guest = vm
    vm.wait_for_ssh(BOOT_TIMEOUT_SECONDS)
    status = wait_for_cloud_init(vm)
    assert status["status"] == "done", status
    assert status["errors"] == [], status
    phases["run_command"], _ = run_the_run_command(vm, acme)
    wait_for_chroma(vm)
    return vm, round(time.monotonic() - started, 1)


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
    phases["run_command"], _ = run_the_run_command(vm, acme)
    wait_for_chroma(vm)
    phases["qemu_start_to_healthy"] = round(time.monotonic() - vm.started_at, 1)
    phases.update(boot_phases(vm))

    assert "making an ext4 filesystem labelled chroma-data" in unit_journal(vm, "chroma-data-disk")
    _source, label, story.filesystem_uuid = data_mount(vm)
    assert label == "chroma-data"
    assert_containers_healthy(vm)
    chroma = container(vm, "chroma")["name"]
    oom = vm.ssh(f"for pid in $(docker top {chroma} -o pid | tail -n +2); do cat /proc/$pid/oom_score_adj; done")
    assert set(oom.stdout.split()) == {str(runtime.CHROMA_OOM_SCORE_ADJ)}, "the OOM killer picks others first"
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
    checksums = f"sha256sum {cloud_config.CADDYFILE} {cloud_config.TOKEN_FILE} {cloud_config.COMPOSE_FILE}"
    files_before = vm.ssh(checksums).stdout
    started = time.monotonic()
    vm.reboot(BOOT_TIMEOUT_SECONDS)
    wait_for_chroma(vm)  # no run command: the files of the last run start it
    assert vm.ssh(checksums).stdout == files_before
    phases["reboot_to_healthy"] = round(time.monotonic() - started, 1)
    phases.update(boot_phases(vm))
    story.multi_user["reboot"] = phases["boot_to_multi_user"]

    assert "already holds Chroma's filesystem" in unit_journal(vm, "chroma-data-disk")
    assert data_mount(vm)[2] == story.filesystem_uuid, "the disk was not reformatted"
    assert_containers_healthy(vm)
    assert "last stop was clean; indexes kept" in guard_log(vm), "the reboot stopped Chroma cleanly"
    phases["smoke_test"] = run_smoke_test(story, acme)
    assert_records_intact(story, acme)
    print_phases("reboot", phases)
    vm_report.passed("reboot")


def test_replacement_vm_keeps_the_data_and_the_certificate(story, guest, acme, vm_report):
    """A new OS disk and instance-id, the same data disk: also the zone-failover rehearsal (issue 16)."""
    assert story.guest is not None, "needs the first guest"
    phases = vm_report.phases("replacement")
    orders_before = acme.orders()
    vm, phases["replace_to_healthy"] = replace_vm(story, "replacement", acme, guest, story.data_disk, phases)
    phases.update(boot_phases(vm))

    assert "already holds Chroma's filesystem" in unit_journal(vm, "chroma-data-disk")
    assert data_mount(vm)[2] == story.filesystem_uuid, "the data disk kept its filesystem"
    phases["smoke_test"] = run_smoke_test(story, acme)
    assert_records_intact(story, acme)
    assert served_certificate(story) == story.certificate, "Caddy serves the certificate it had"
    assert acme.orders() == orders_before, "the replacement asked pebble for no new certificate"
    print_phases("replacement VM", phases)
    vm_report.passed("replacement")


def writer_record(batch: int, index: int) -> tuple[str, list[float]]:
    """One record the writer adds: its id and embedding follow from where it is, so a check can recompute them."""
    key = batch * WRITER_BATCH + index
    return f"w-{batch}-{index}", [round(math.sin(key * 1.3 + dimension), 6) for dimension in range(WRITER_DIMENSIONS)]


class Writer(threading.Thread):
    """Adds batches through the proxy without pause until stopped; remembers each acknowledged batch."""

    def __init__(self, collection) -> None:
        super().__init__(daemon=True)
        self.collection = collection
        self.acknowledged: list[int] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        batch = 0
        while not self.halt.is_set():
            records = [writer_record(batch, index) for index in range(WRITER_BATCH)]
            try:
                self.collection.add(ids=[key for key, _ in records], embeddings=[vector for _, vector in records])
                self.acknowledged.append(batch)
            except Exception as error:  # a failed write is reported, and the writer goes on
                self.errors.append(f"batch {batch}: {type(error).__name__}: {error}")
            batch += 1

    def wait_for(self, batches: int, timeout: float) -> None:
        """Waits until `batches` batches are acknowledged."""
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < batches:
            if time.monotonic() > deadline or not self.is_alive():
                raise AssertionError(f"{len(self.acknowledged)} of {batches} batches written; {self.errors[-3:]}")
            time.sleep(0.2)


def copy_while_writing(story: Story, acme, copy: Path) -> tuple[list[int], float, Writer]:
    """A crash-consistent copy of the running VM's data disk, taken mid-write.

    Returns the batches acknowledged before the copy began, the copy's seconds, and the writer.
    """
    vm = story.guest
    assert vm is not None
    with smoke_test.resolved(FQDN, "127.0.0.1"):
        client = chroma_client(story, acme)
        writer = Writer(client.get_or_create_collection(WRITER_COLLECTION, configuration=WRITER_CONFIGURATION))
        writer.start()
        try:
            writer.wait_for(BATCHES_BEFORE_COPY, 300)
            before_copy = list(writer.acknowledged)
            seconds = vm.copy_data_disk(copy)
            writer.wait_for(len(writer.acknowledged) + BATCHES_AFTER_COPY, 300)
        finally:
            writer.halt.set()
            writer.join(timeout=120)
    assert not writer.errors, f"writes to the running VM failed: {writer.errors}"
    return before_copy, round(seconds, 1), writer


def index_problems(copy: Path, scratch: Path) -> dict[str, str | None]:
    """What chroma_data.py finds wrong with each collection's vector index in a disk copy, before any repair.

    Read off a scratch copy with e2fsprogs: e2fsck replays the journal as a mount would, and debugfs
    copies Chroma's data directory out; the copy that boots is not touched.
    """
    image, files = scratch / "inspect.img", scratch / "inspect"
    files.mkdir()
    subprocess.run(["cp", "--sparse=always", str(copy), str(image)], check=True)
    fsck = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True, check=False)
    assert fsck.returncode in (0, 1), f"e2fsck could not make the copy mountable: {fsck.stdout}{fsck.stderr}"
    subprocess.run(["debugfs", "-R", f"rdump /data {files}", str(image)], check=True, capture_output=True)
    image.unlink()
    data_dir = files / "data"
    return {
        segment.collection_name: chroma_data.index_problem(data_dir, segment)
        for segment in chroma_data.vector_segments(data_dir)
    }


def assert_writes_restored(story: Story, acme, batches: list[int]) -> int:
    """Each batch acknowledged before the copy is back, with its exact embeddings, and a query finds it; the count."""
    expected = dict(writer_record(batch, index) for batch in batches for index in range(WRITER_BATCH))
    sample = list(expected)[:: max(1, len(expected) // 20)]
    with smoke_test.resolved(FQDN, "127.0.0.1"):
        collection = chroma_client(story, acme).get_collection(WRITER_COLLECTION)
        stored = collection.get(ids=list(expected), include=["embeddings"])
        found = collection.query(query_embeddings=[expected[key] for key in sample], n_results=1, include=[])
        count = collection.count()
    missing = sorted(set(expected) - set(stored["ids"]))
    assert not missing, f"{len(missing)} of {len(expected)} acknowledged records lost, e.g. {missing[:5]}"
    for key, embedding in zip(stored["ids"], stored["embeddings"], strict=True):
        assert list(embedding) == pytest.approx(expected[key], abs=1e-6), key
    assert [hits[0] for hits in found["ids"]] == sample, "a query by its own vector finds each sampled record"
    return count


def verify_through_proxy(story: Story, acme) -> tuple[float, int]:
    """The runbook's `chroma_data.py verify` from the host, through the proxy with the token: (seconds, collections)."""
    output = io.StringIO()
    endpoint = f"https://{FQDN}:{story.forwards.https}"
    started = time.monotonic()
    with smoke_test.resolved(FQDN, "127.0.0.1"), contextlib.redirect_stdout(output):
        code = chroma_data.main(
            ["verify", "--endpoint", endpoint, "--ca-cert", str(pebble_root(acme, story))], {"CHROMA_TOKEN": TOKEN}
        )
    seconds = round(time.monotonic() - started, 1)
    assert code == 0, output.getvalue()
    whole = re.search(r"verify: (\d+) of \1 collections whole", output.getvalue())
    assert whole, output.getvalue()
    return seconds, int(whole[1])


def guard_log(guest: Guest) -> str:
    """What the data guard logged on this boot (its container logs to the journal under its tag)."""
    return guest.ssh(f"journalctl -b --no-pager -o cat -t {cloud_config.GUARD_JOURNAL_TAG}").stdout


def test_restore_of_a_copy_taken_mid_write_repairs_itself_and_serves(story, guest, acme, vm_report):
    """README's restore runbook, on a crash-consistent copy of the running VM's data disk (issue 17).

    Azure's stand-ins: a snapshot or recovery point of the running disk is QEMU's `blockdev-backup`,
    taken while a client writes through the proxy; `dataDiskSourceId` is a new VM booted on the copy.
    """
    assert story.guest is not None, "needs the replacement guest"
    phases = vm_report.phases("restore")
    copy = story.workdir / "restored.img"
    before_copy, phases["copy_while_writing"], writer = copy_while_writing(story, acme, copy)
    problems = index_problems(copy, story.workdir)
    vm_report.details("restore")["indexes_before_repair"] = problems
    print(f"\nthe copy's indexes before repair: {problems}")
    vm, phases["restore_to_healthy"] = replace_vm(story, "restored", acme, guest, copy, phases)

    # Runbook step 3: the guard found no marker, moved every index aside and rebuilt it from the log.
    log = guard_log(vm)
    assert "no clean-shutdown marker" in log, log
    assert {COLLECTION, WRITER_COLLECTION} <= set(re.findall(r"moved aside (\S+):", log)), log
    rebuilt = re.search(r"rebuilt (\d+) collections from the write log in ([\d.]+)s", log)
    assert rebuilt, log
    assert int(rebuilt[1]) >= 2, log
    assert re.search(r"after-start: verify: (\d+) of \1 collections whole", log), log
    phases["rebuild"] = float(rebuilt[2])
    # Step 4: verify through the proxy, then the smoke test; and every write acknowledged before the copy.
    phases["verify"], collections = verify_through_proxy(story, acme)
    assert collections >= 2
    phases["smoke_test"] = run_smoke_test(story, acme)
    assert_records_intact(story, acme)
    count = assert_writes_restored(story, acme, before_copy)
    total = len(writer.acknowledged) * WRITER_BATCH
    print(
        f"\nrestore: {len(before_copy) * WRITER_BATCH} records acknowledged before the copy, all restored;"
        f" {total} by the writer's end; the copy holds {count}"
    )
    print_phases("restore from a copy taken mid-write", phases)
    vm_report.passed("restore")


class Prober(threading.Thread):
    """Asks for a collection's count through the proxy without pause until stopped; keeps (start, end, outcome)."""

    def __init__(self, story: Story, acme, collection_id: str) -> None:
        super().__init__(daemon=True)
        self.url = f"https://{FQDN}:{story.forwards.https}/api/v2/tenants/default_tenant/databases/default_database"
        self.path = f"/collections/{collection_id}/count"
        self.verify = ssl.create_default_context(cafile=str(pebble_root(acme, story)))
        self.results: list[tuple[float, float, int | str]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        headers = {AUTHORIZATION: runtime.auth_value(AUTHORIZATION, TOKEN)}
        with httpx.Client(base_url=self.url, verify=self.verify, headers=headers, timeout=10) as client:
            while not self.halt.is_set():
                start = time.monotonic()
                try:
                    outcome: int | str = client.get(self.path).status_code
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                self.results.append((start, time.monotonic(), outcome))
                time.sleep(0.1)

    def failed(self) -> list[int | str]:
        return [outcome for _, _, outcome in self.results if outcome != 200]

    def down_seconds(self) -> float:
        """How long Chroma did not answer (live.down_seconds)."""
        return round(down_seconds([(start, end, outcome == 200) for start, end, outcome in self.results]), 1)


def container(guest: Guest, service: str) -> dict[str, str]:
    """The id, start time and image of a compose service's container in the guest."""
    name = f"{yaml.safe_load(user_data.runtime_files().compose)['name']}-{service}-1"
    line = guest.ssh(f"docker inspect --format '{{{{.Id}}}} {{{{.State.StartedAt}}}} {{{{.Config.Image}}}}' {name}")
    container_id, started, image = line.stdout.split()
    return {"name": name, "id": container_id, "started": started, "image": image}


def test_version_change_recreates_chroma_alone(story, acme, vm_report):
    """A `chromaVersion` change on the running VM: the run command, to the previous release and back (issue 12).

    The other release's stand-in is already in the guest's Docker, as a pull would leave it (the
    pull happens while the old container serves, so it adds nothing to the downtime).
    """
    vm = story.guest
    assert vm is not None, "needs the restored guest"
    phases = vm_report.phases("version_change")
    with smoke_test.resolved(FQDN, "127.0.0.1"):
        collection_id = str(chroma_client(story, acme).get_collection(COLLECTION).id)
        for version in (user_data.OTHER_CHROMA_VERSION, pinned_chroma_version()):
            proxy, chroma = container(vm, "proxy"), container(vm, "chroma")
            prober = Prober(story, acme, collection_id)
            prober.start()
            try:
                seconds, output = run_the_run_command(vm, acme, version)
                time.sleep(2)  # answers after the change, too
            finally:
                prober.halt.set()
                prober.join(timeout=30)
            assert "recreating what changed" in output, output
            assert container(vm, "proxy") == proxy, "the proxy was not touched"
            now = container(vm, "chroma")
            assert now["id"] != chroma["id"], "Chroma's container was replaced"
            assert now["image"] == runtime.chroma_image(version)
            # The stand-in's own record of the release it runs (its chromadb package).
            inside = vm.ssh(
                f"docker exec {now['name']} /opt/chromadb/bin/python -c 'import chromadb; print(chromadb.__version__)'"
            )
            assert inside.stdout.strip() == version
            assert set(prober.failed()) <= {502}, f"only the proxy's 502 while Chroma restarts: {prober.failed()}"
            assert prober.results[-1][2] == 200, "serving again"
            phases[f"to_{version}_run_command"] = seconds
            phases[f"to_{version}_chroma_down"] = prober.down_seconds()
            print(f"\nversion change to {version}: {len(prober.failed())} of {len(prober.results)} requests got 502")
    assert_containers_healthy(vm)
    assert_records_intact(story, acme)
    print_phases("version change", phases)
    vm_report.passed("version_change")


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
