"""The VM's data-disk preparation, run unchanged against a real loop device as root.

The script and the units come from the rendered cloud-config's write_files. Only what the VM gets
from Azure is pointed elsewhere, through the script's own environment: DATA_DISK_CANDIDATES names
a symlink to the loop device (where Azure's udev rules make /dev/disk/azure/data/by-lun/N), and
DATA_DISK_WAIT_SECONDS is short. This shows that a blank disk gets Chroma's filesystem and holds
Chroma's data; that a replacement VM finds that filesystem, does not format it, and reads the data
intact; that a disk holding anything else is refused untouched, with a message saying what to do;
and that a disk that never appears fails after the bounded wait.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path, PurePosixPath

import chromadb
import pytest
from chromadb.config import Settings
from live import LOOPBACK, chroma_server
from vm_fixtures import (
    DISK_SIZE_BYTES,
    chroma_environment,
    loop_device,
    mounted,
    probe,
    unit,
    unit_environment,
    vm_files,
)

from components import cloud_config

WAIT_SECONDS = 3
LUN = "0"


@pytest.fixture(scope="module")
def files():
    return vm_files()


@pytest.fixture
def mount_unit(files):
    """srv-chroma.mount's What=, Where=, Type= and Options=."""
    mount = unit(files, "srv-chroma.mount")["Mount"]
    return {key: mount[key][0] for key in ("What", "Where", "Type", "Options")}


def prepare(
    files: dict[str, str],
    tmp_path: Path,
    device: str | None,
    wait_seconds: int = WAIT_SECONDS,
    extra_env: dict[str, str] | None = None,
):
    """Runs the VM's script as its unit runs it, with the disk's link pointing at `device`."""
    script = tmp_path / "chroma-prepare-data-disk"
    script.write_text(files[cloud_config.DISK_SCRIPT], encoding="utf-8")
    script.chmod(0o755)
    # Stands in for /dev/disk/azure/data/by-lun/<LUN>, which azure-vm-utils' udev rules make on the VM.
    link = tmp_path / "by-lun" / LUN
    link.parent.mkdir(exist_ok=True)
    if device is not None and not link.is_symlink():
        link.symlink_to(device)
    unit_env = unit_environment(unit(files, "chroma-data-disk.service"))
    assert unit_env["DATA_DISK_LUN"] == LUN
    env = {
        **os.environ,
        **unit_env,
        "DATA_DISK_CANDIDATES": str(link),
        "DATA_DISK_WAIT_SECONDS": str(wait_seconds),
        **(extra_env or {}),
    }
    return subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120, check=False)


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def image_checksum(image: Path) -> str:
    return hashlib.sha256(image.read_bytes()).hexdigest()


def resolve_what(what: str, device: str) -> str:
    """The mount unit's What=, resolved as udev would.

    Without udev here, /dev/disk/by-label/<label> does not exist: blkid finds the devices that
    carry the label instead. Other loop devices on this machine may carry it too, so this checks
    that ours is among them rather than trusting the first hit.
    """
    label = PurePosixPath(what).name
    assert what == f"/dev/disk/by-label/{label}"
    found = subprocess.run(
        ["blkid", "-t", f"LABEL={label}", "-o", "device"], capture_output=True, text=True, check=False
    ).stdout.split()
    assert device in found, f"blkid finds no LABEL={label} on {device}"
    return device


def chroma_data_dir(mountpoint: Path, where: str) -> Path:
    """/srv/chroma/data, with the mount at `mountpoint` instead of Where=."""
    return mountpoint / PurePosixPath(cloud_config.CHROMA_DATA_DIR).relative_to(where)


def chroma_client(port: int):
    return chromadb.HttpClient(host=LOOPBACK, port=port, settings=Settings(anonymized_telemetry=False))


def test_units_agree_on_the_disk_label(files, mount_unit):
    label = unit_environment(unit(files, "chroma-data-disk.service"))["DATA_DISK_LABEL"]
    assert mount_unit["What"] == f"/dev/disk/by-label/{label}"
    assert mount_unit["Where"] == cloud_config.DATA_MOUNT
    assert cloud_config.CHROMA_DATA_DIR.startswith(mount_unit["Where"] + "/")


def test_disk_script_is_shellcheck_clean(files, tmp_path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); .ci/run installs it")
    script = tmp_path / "chroma-prepare-data-disk"
    script.write_text(files[cloud_config.DISK_SCRIPT], encoding="utf-8")
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_blank_disk_gets_chromas_filesystem_and_a_replacement_vm_keeps_the_data(files, mount_unit, tmp_path):
    mountpoint = tmp_path / "srv-chroma"
    with loop_device(tmp_path / "disk.img") as device:
        # First boot: a blank disk.
        first = prepare(files, tmp_path, device)
        assert first.returncode == 0, first.stderr
        assert "is blank: no signature, no partition table, zeros in its first and last 16 MiB" in first.stderr
        assert "(read 32 MiB of 64 MiB); making an ext4 filesystem" in first.stderr
        made = probe(device)
        label = PurePosixPath(mount_unit["What"]).name
        assert (made["TYPE"], made["LABEL"]) == (mount_unit["Type"], label)

        with mounted(resolve_what(mount_unit["What"], device), mountpoint, mount_unit["Type"], mount_unit["Options"]):
            source = subprocess.run(
                ["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", str(mountpoint)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            assert source[:2] == [device, "ext4"]
            assert "noatime" in source[2].split(",")
            data_dir = chroma_data_dir(mountpoint, mount_unit["Where"])
            with chroma_server(mountpoint, chroma_environment(files)) as chroma:
                assert chroma.persist_path == data_dir
                collection = chroma_client(chroma.port).create_collection("kept", embedding_function=None)
                collection.upsert(ids=[f"id-{n}" for n in range(50)], embeddings=[[float(n), 1.0] for n in range(50)])
            assert (data_dir / "chroma.sqlite3").is_file()
            assert data_dir.stat().st_dev == mountpoint.stat().st_dev != tmp_path.stat().st_dev, "data is on the disk"
            before = checksums(data_dir)

        # A replacement VM: the same disk, attached again.
        again = prepare(files, tmp_path, device)
        assert again.returncode == 0, again.stderr
        assert "already holds Chroma's filesystem" in again.stderr
        assert "making an ext4" not in again.stderr
        assert probe(device)["UUID"] == made["UUID"], "the filesystem was not made anew"

        with mounted(resolve_what(mount_unit["What"], device), mountpoint, mount_unit["Type"], mount_unit["Options"]):
            assert checksums(data_dir) == before
            with chroma_server(mountpoint, chroma_environment(files)) as chroma:
                assert chroma_client(chroma.port).get_collection("kept").count() == 50


def write_at(device: str, offset: int, data: bytes) -> None:
    with open(device, "r+b") as disk:
        disk.seek(offset)
        disk.write(data)


def make(*command: str):
    """Puts what `command` makes on the device."""
    return lambda device: subprocess.run([*command, device], check=True, capture_output=True)


def partition_table_with_data(device: str) -> None:
    subprocess.run(["sfdisk", "--quiet", device], input=b"label: gpt\n,,L\n", check=True, capture_output=True)
    write_at(device, 2 * 1024 * 1024, b"someone's data" * 1000)


def raw_data(device: str) -> None:
    write_at(device, 64 * 1024, b"someone's data" * 1000)


MIB = 1024 * 1024
# sfdisk and wipefs ask a loop device without partition scanning to re-read its table, and say it failed.
QUIET = {"check": True, "capture_output": True}


def zero(device: str, offset: int, length: int) -> None:
    write_at(device, offset, b"\0" * length)


def gpt_with_primary_header_zeroed(device: str) -> None:
    """A GPT disk whose first MiB (protective MBR, primary header, entries) was zeroed; the backup is intact."""
    subprocess.run(["sfdisk", "--quiet", device], input=b"label: gpt\nstart=20M,size=8M,type=L\n", **QUIET)
    write_at(device, 21 * MIB, b"someone's data" * 1000)
    zero(device, 0, MIB)


def ext4_partition_with_table_wiped_by_wipefs(device: str) -> None:
    """`wipefs -a` on the disk instead of its partition: the table's signatures go, the ext4 in partition 1 stays."""
    subprocess.run(["sfdisk", "--quiet", device], input=b"label: gpt\nstart=1M,size=16M,type=L\n", **QUIET)
    subprocess.run(["mkfs.ext4", "-q", "-L", "backups", "-E", "offset=1048576", device, "16M"], **QUIET)
    subprocess.run(["wipefs", "--all", "--quiet", device], **QUIET)


def ext4_partition_with_table_zeroed(device: str) -> None:
    """An MBR disk with ext4 in partition 1, whose first MiB (the table) was zeroed with dd."""
    subprocess.run(["sfdisk", "--quiet", device], input=b"label: dos\nstart=2048,size=32768,type=83\n", **QUIET)
    subprocess.run(["mkfs.ext4", "-q", "-L", "backups", "-E", "offset=1048576", device, "16M"], **QUIET)
    zero(device, 0, MIB)


def data_past_the_first_mib(device: str) -> None:
    write_at(device, 10 * MIB, b"someone's data" * 1000)


def data_near_the_end(device: str) -> None:
    write_at(device, DISK_SIZE_BYTES - 3 * MIB, b"someone's data" * 1000)


# What the disk holds -> (how to put it there, what the script must say about it).
FOREIGN = {
    "ext4 with another label": (make("mkfs.ext4", "-q", "-L", "backups"), "holds ext4 labelled backups"),
    "ext3 with Chroma's label": (make("mkfs.ext3", "-q", "-L", "chroma-data"), "holds ext3 labelled chroma-data"),
    "swap": (make("mkswap", "-L", "swap"), "holds swap"),
    "partition table with data": (partition_table_with_data, "holds a gpt partition table"),
    "raw data, no signature": (raw_data, "holds data in its first 16 MiB"),
    "GPT, primary header zeroed": (gpt_with_primary_header_zeroed, "holds a backup GPT partition table at its end"),
    "ext4 partition, table wiped by wipefs": (
        ext4_partition_with_table_wiped_by_wipefs,
        "holds ext4 at offset 2048 sectors, where a partition starts",
    ),
    "ext4 partition, table zeroed": (
        ext4_partition_with_table_zeroed,
        "holds ext4 at offset 2048 sectors, where a partition starts",
    ),
    "data past the first MiB": (data_past_the_first_mib, "holds data in its first 16 MiB"),
    "data near the end": (data_near_the_end, "holds data in its last 16 MiB"),
}


@pytest.mark.parametrize("content", FOREIGN, ids=list(FOREIGN))
def test_disk_holding_anything_else_is_refused_untouched(files, tmp_path, content):
    put_there, message = FOREIGN[content]
    image = tmp_path / "disk.img"
    with loop_device(image) as device:
        put_there(device)
        subprocess.run(["sync"], check=True)
        signature, checksum = probe(device), image_checksum(image)

        result = prepare(files, tmp_path, device)

        assert result.returncode != 0
        assert message in result.stderr
        assert "Refusing to format it; nothing was written" in result.stderr
        assert "zero both ends" in result.stderr, "the message says how to proceed"
        assert probe(device) == signature
    assert image_checksum(image) == checksum, "not one byte of the disk may change"


def test_disk_that_never_appears_fails_after_the_bounded_wait(files, tmp_path):
    started = time.monotonic()
    result = prepare(files, tmp_path, device=None)
    waited = time.monotonic() - started
    assert result.returncode != 0
    assert f"no data disk appeared at LUN {LUN} within {WAIT_SECONDS}s" in result.stderr
    assert "Chroma stays stopped until it is there" in result.stderr
    assert WAIT_SECONDS <= waited < WAIT_SECONDS + 30, f"waited {waited:.1f}s"


def test_a_link_to_something_not_a_disk_is_refused(files, tmp_path):
    not_a_disk = tmp_path / "not-a-disk"
    not_a_disk.write_bytes(b"\0" * 4096)
    result = prepare(files, tmp_path, str(not_a_disk))
    assert result.returncode != 0
    assert "is not a block device" in result.stderr
    assert not_a_disk.read_bytes() == b"\0" * 4096


def test_wait_retriggers_udev_until_the_link_appears(files, tmp_path):
    """The by-lun link comes only from udev rules installed after boot: the wait must replay "add" events."""
    calls = tmp_path / "udevadm.calls"
    fake = tmp_path / "bin" / "udevadm"
    fake.parent.mkdir()
    # Stands in for udev with azure-vm-utils' rules installed late: only a replayed block "add" makes the link.
    fake.write_text(
        "#!/bin/sh\n"
        'echo "$*" >>"$UDEVADM_CALLS"\n'
        'if [ "$*" = "trigger --subsystem-match=block --action=add" ]; then ln -sfn "$DISK" "$LINK"; fi\n',
        encoding="utf-8",
    )
    fake.chmod(0o755)
    with loop_device(tmp_path / "disk.img") as device:
        link = tmp_path / "by-lun" / LUN
        env = {
            "PATH": f"{fake.parent}:{os.environ['PATH']}",
            "UDEVADM_CALLS": str(calls),
            "DISK": device,
            "LINK": str(link),
        }
        result = prepare(files, tmp_path, device=None, wait_seconds=20, extra_env=env)
        assert result.returncode == 0, result.stderr
        assert "making an ext4 filesystem" in result.stderr
        assert probe(device)["LABEL"] == "chroma-data"
    assert "trigger --subsystem-match=block --action=add" in calls.read_text().splitlines()


def test_blank_check_of_a_4_tib_disk_reads_32_mib(files, tmp_path):
    """The cost stays small on a big disk: both 16 MiB ends are read, not the whole disk."""
    calls = tmp_path / "mkfs.calls"
    fake = tmp_path / "bin" / "mkfs.ext4"
    fake.parent.mkdir()
    # Stands in for mkfs, which would write a 1 GiB journal into the sparse image: only the check is measured.
    fake.write_text('#!/bin/sh\necho "$*" >>"$MKFS_CALLS"\n', encoding="utf-8")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}", "MKFS_CALLS": str(calls)}
    with loop_device(tmp_path / "disk.img", size=4 * 1024**4) as device:
        started = time.monotonic()
        blank = prepare(files, tmp_path, device, extra_env=env)
        took = time.monotonic() - started
        assert blank.returncode == 0, blank.stderr
        assert "(read 32 MiB of 4194304 MiB); making an ext4 filesystem" in blank.stderr
        assert calls.read_text().split() == ["-q", "-L", "chroma-data", "--", device]
        assert took < 30, f"the check took {took:.1f}s"
        write_at(device, 4 * 1024**4 - 5 * MIB, b"someone's data")
        calls.unlink()
        refused = prepare(files, tmp_path, device, extra_env=env)
        assert refused.returncode != 0
        assert "holds data in its last 16 MiB" in refused.stderr
        assert not calls.exists()
