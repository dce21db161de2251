"""One QEMU guest (TCG): its OS disk overlay, NoCloud seed, data disk, QMP socket, serial log and SSH.

Networking is QEMU's user mode with `restrict=on`: the guest reaches nothing, not even the host,
except through the forwards set here (SSH, 80 and 443 in; the ACME server out, at 10.0.2.100).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from guest_image import GuestImage

# The guest's address for the host's ACME server (a guestfwd target).
ACME_GUEST_ADDRESS = "10.0.2.100"
ACME_GUEST_PORT = 14000
MEMORY_MIB = 3072
CPUS = 2
DATA_DISK_ID = "chroma-data-disk"
DATA_NODE = "chroma-data-node"
SSH_TIMEOUT_SECONDS = 30
# Where Azure attaches the data disk: LUN 0 (the test udev rule links it as Azure's rules do).
LUN_0 = "bus=scsi0.0,channel=0,scsi-id=0,lun=0"


@dataclass(frozen=True)
class Forwards:
    """Loopback ports on the host that reach the guest's SSH, HTTP and HTTPS, and the host's ACME port."""

    ssh: int
    http: int
    https: int
    acme: int


def make_seed(path: Path, user_data: str, instance_id: str, hostname: str) -> None:
    """A NoCloud seed disk: a FAT filesystem labelled CIDATA with user-data and meta-data."""
    work = path.with_suffix(".d")
    work.mkdir()
    (work / "user-data").write_text(user_data, encoding="utf-8")
    (work / "meta-data").write_text(f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n", encoding="utf-8")
    subprocess.run(["mkfs.vfat", "-n", "CIDATA", "-C", str(path), "2048"], check=True, capture_output=True)
    subprocess.run(["mcopy", "-i", str(path), str(work / "user-data"), str(work / "meta-data"), "::"], check=True)
    shutil.rmtree(work)


def make_os_disk(path: Path, image: GuestImage) -> None:
    """A new OS disk: a copy-on-write overlay of the built image."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "raw", str(path)], check=True
    )


class Qmp:
    """A QEMU Machine Protocol client on a unix socket: one command at a time, events skipped."""

    def __init__(self, path: Path) -> None:
        self._socket = socket.socket(socket.AF_UNIX)
        self._socket.settimeout(30)
        self._socket.connect(str(path))
        self._reader = self._socket.makefile("r", encoding="utf-8")
        json.loads(self._reader.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments) -> dict:
        """Runs one command; raises with QEMU's message when it fails."""
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self._socket.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = json.loads(self._reader.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']['desc']}")

    def close(self) -> None:
        """Closes the socket."""
        self._reader.close()
        self._socket.close()


class Guest:
    """A running guest. `ssh` runs a command as root; `attach_data_disk` hot-plugs a disk at LUN 0."""

    def __init__(self, image: GuestImage, workdir: Path, forwards: Forwards) -> None:
        self.image = image
        self.workdir = workdir
        self.forwards = forwards
        self.serial_log = workdir / "serial.log"
        self.qmp_path = workdir / "qmp.sock"
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self._qmp: Qmp | None = None

    def _command(self, os_disk: Path, seed: Path, data_disk: Path | None) -> list[str]:
        forwards = self.forwards
        # Each guest connection to the ACME address runs socat, which connects to pebble on the host.
        netdev = ",".join(
            [
                "user,id=net0,restrict=on",
                f"hostfwd=tcp:127.0.0.1:{forwards.ssh}-:22",
                f"hostfwd=tcp:127.0.0.1:{forwards.http}-:80",
                f"hostfwd=tcp:127.0.0.1:{forwards.https}-:443",
                f"guestfwd=tcp:{ACME_GUEST_ADDRESS}:{ACME_GUEST_PORT}-cmd:socat - TCP:127.0.0.1:{forwards.acme}",
            ]
        )
        command = [
            "qemu-system-x86_64",
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", str(CPUS),
            "-m", str(MEMORY_MIB),
            "-display", "none",
            "-monitor", "none",
            "-nodefaults",
            "-serial", f"file:{self.serial_log}",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initrd),
            "-append", "console=ttyS0 root=/dev/vda rw",
            "-drive", f"file={os_disk},if=virtio,format=qcow2",
            "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
            "-device", "virtio-scsi-pci,id=scsi0",
            "-netdev", netdev,
            "-device", "virtio-net-pci,netdev=net0,romfile=",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if data_disk is not None:
            command += [
                "-blockdev", f"driver=raw,node-name={DATA_NODE}-boot,file.driver=file,file.filename={data_disk}",
                "-device", f"scsi-hd,id={DATA_DISK_ID}-boot,drive={DATA_NODE}-boot,{LUN_0}",
            ]  # fmt: skip
        return command

    def start(self, os_disk: Path, seed: Path, data_disk: Path | None) -> None:
        """Powers the guest on."""
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self._command(os_disk, seed, data_disk),
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "qemu.log", "ab"),  # noqa: SIM115 - the child keeps it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def qmp(self) -> Qmp:
        """The QMP connection, opened on first use."""
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_path)
        return self._qmp

    def ssh(
        self, command: str, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        """Runs a shell command in the guest as root, with `stdin` (if given) as its input."""
        result = subprocess.run(
            [
                "ssh",
                "-i",
                str(self.image.ssh_key),
                "-p",
                str(self.forwards.ssh),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
                "-o",
                f"ConnectTimeout={SSH_TIMEOUT_SECONDS}",
                "root@127.0.0.1",
                command,
            ],
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"in the guest, `{command}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def boot_id(self) -> str | None:
        """The guest's boot id, or None while SSH does not answer."""
        try:
            result = self.ssh("cat /proc/sys/kernel/random/boot_id", check=False, timeout=60)
        except subprocess.TimeoutExpired:
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    def wait_for_ssh(self, timeout: float, previous_boot_id: str | None = None) -> str:
        """Waits until SSH answers on a boot other than `previous_boot_id`; the boot id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"QEMU exited with {self.process.returncode}; see {self.workdir / 'qemu.log'}")
            boot_id = self.boot_id()
            if boot_id and boot_id != previous_boot_id:
                return boot_id
            time.sleep(3)
        raise AssertionError(f"no SSH within {timeout:.0f}s; serial log: {self.serial_log}\n{self.serial_tail()}")

    def serial_tail(self, lines: int = 40) -> str:
        """The end of the serial console log."""
        if not self.serial_log.exists():
            return ""
        return "\n".join(self.serial_log.read_text(errors="replace").splitlines()[-lines:])

    def wait_for(self, command: str, timeout: float, what: str) -> None:
        """Polls a guest command until it exits 0."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.ssh(command, check=False).returncode == 0:
                    return
            time.sleep(3)
        raise AssertionError(f"{what}: not within {timeout:.0f}s")

    def monotonic_seconds(self, unit: str, prop: str = "ActiveEnterTimestampMonotonic") -> float | None:
        """Seconds after the kernel started at which a unit reached a state, or None if it has not."""
        value = self.ssh(f"systemctl show --value --property={prop} {shlex.quote(unit)}").stdout.strip()
        return int(value) / 1e6 if value and value != "0" else None

    def uptime(self) -> float:
        """The guest's seconds since its kernel started."""
        return float(self.ssh("cut -d' ' -f1 /proc/uptime").stdout.split()[0])

    def attach_data_disk(self, data_disk: Path, name: str = "data") -> None:
        """Hot-plugs a disk at LUN 0 of the virtio-scsi controller, as Azure attaches a data disk."""
        qmp = self.qmp()
        node = f"{DATA_NODE}-{name}"
        qmp.execute(
            "blockdev-add", driver="raw", file={"driver": "file", "filename": str(data_disk)}, **{"node-name": node}
        )
        options = {"scsi-id": 0}
        qmp.execute(
            "device_add",
            driver="scsi-hd",
            id=f"{DATA_DISK_ID}-{name}",
            drive=node,
            bus="scsi0.0",
            channel=0,
            lun=0,
            **options,
        )

    def detach_data_disk(self, name: str, timeout: float = 120) -> None:
        """Unplugs a disk attached by `attach_data_disk`, and waits until QEMU has let go of its file."""
        qmp = self.qmp()
        qmp.execute("device_del", id=f"{DATA_DISK_ID}-{name}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                qmp.execute("blockdev-del", **{"node-name": f"{DATA_NODE}-{name}"})
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def copy_data_disk(self, target: Path, timeout: float = 600) -> float:
        """A crash-consistent copy of the boot-attached data disk, taken while the guest runs; its seconds.

        QEMU's `blockdev-backup` (sync=full) copies the disk as it stood when the job started: what
        the guest had written to the disk then, not what was still in its page cache. That is what a
        host crash, or a snapshot of a running Azure disk, leaves.
        """
        qmp = self.qmp()
        node, job = f"{DATA_NODE}-copy", f"{DATA_NODE}-copy-job"
        nodes = qmp.execute("query-named-block-nodes", flat=True)
        (source,) = [entry for entry in nodes if entry["node-name"] == f"{DATA_NODE}-boot"]
        subprocess.run(["truncate", "-s", str(source["image"]["virtual-size"]), str(target)], check=True)
        qmp.execute(
            "blockdev-add",
            driver="raw",
            file={"driver": "file", "filename": str(target), "discard": "unmap"},
            **{"node-name": node, "discard": "unmap", "detect-zeroes": "unmap"},
        )
        started = time.monotonic()
        qmp.execute(
            "blockdev-backup", device=f"{DATA_NODE}-boot", target=node, sync="full",
            **{"job-id": job, "auto-dismiss": False},
        )  # fmt: skip
        try:
            while True:
                (state,) = [entry for entry in qmp.execute("query-jobs") if entry["id"] == job]
                if state["status"] == "concluded":
                    if "error" in state:
                        raise AssertionError(f"blockdev-backup failed: {state['error']}")
                    break
                if time.monotonic() - started > timeout:
                    qmp.execute("job-cancel", id=job, force=True)
                    raise AssertionError(f"blockdev-backup not done within {timeout:.0f}s: {state}")
                time.sleep(0.5)
        finally:
            with contextlib.suppress(RuntimeError):
                qmp.execute("job-dismiss", id=job)
            qmp.execute("blockdev-del", **{"node-name": node})
        return time.monotonic() - started

    def reboot(self, timeout: float) -> str:
        """Reboots from inside the guest and waits for SSH on the new boot; the new boot id."""
        previous = self.boot_id()
        self.ssh("systemctl reboot", check=False, timeout=30)
        return self.wait_for_ssh(timeout, previous_boot_id=previous)

    def stop(self) -> None:
        """Powers the guest off: an ACPI shutdown first, then the process is ended."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.qmp().execute("system_powerdown")
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)
        if self._qmp is not None:
            with contextlib.suppress(OSError):
                self._qmp.close()
            self._qmp = None
