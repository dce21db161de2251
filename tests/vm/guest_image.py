"""The guest's OS disk: a Debian 13 root filesystem with the Azure stand-ins, cached by a hash of its inputs.

What goes in is named in test_vm_boot.py's docstring (the stand-ins); this module only builds it.
The build runs `mmdebstrap` (Debian's mirror is the one network access), adds the stand-in files,
makes an ext4 image with `mke2fs -d`, and keeps the kernel and initrd beside it. Every VM then
boots from its own copy-on-write overlay of that image, so a new OS disk costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

SUITE = "trixie"
MIRROR = "http://deb.debian.org/debian"
# What Ubuntu 24.04's Azure image has, or what the cloud-config's `packages:` would install from
# Ubuntu's archive: docker.io, Debian 13's compose v2 (`docker-compose`) and its CLI (`docker-cli`).
PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    "openssh-server",
    "linux-image-amd64",
    "e2fsprogs",
    "iproute2",
    "kmod",
    "procps",
    "ca-certificates",
    "docker.io",
    "docker-cli",
    "docker-compose",
)
ROOT_SIZE = "6G"
CACHE_ROOT = Path(os.environ.get("CHROMA_INFRA_CACHE", Path.home() / ".cache" / "chroma-infra")) / "vm-guest"
LOCAL_REPO = "/opt/chroma-test/apt"
DOCKERD_START_SECONDS = 60

# Ubuntu package names the cloud-config installs, as local packages: name -> what it stands for.
EQUIVS_PACKAGES = {
    "docker-compose-v2": ("docker-compose", "Ubuntu's compose v2 package name; Debian 13 calls it docker-compose."),
    "azure-vm-utils": ("", "Ubuntu's Azure disk-link package; the links come from the test udev rule."),
}

# Azure's by-LUN links, for the virtio-scsi disk at LUN 0 (Azure: WALinuxAgent's scsi1/lunN and
# azure-vm-utils' data/by-lun/N).
UDEV_RULE = textwrap.dedent(
    """\
    # Test stand-in for Azure's data-disk links: the virtio-scsi disk at LUN 0.
    ACTION=="add|change", SUBSYSTEM=="block", ENV{DEVTYPE}=="disk", KERNEL=="sd*", KERNELS=="*:0:0:0", \\
      SYMLINK+="disk/azure/scsi1/lun0", SYMLINK+="disk/azure/data/by-lun/0"
    """
)

CLOUD_CFG = textwrap.dedent(
    """\
    # Test stand-in: the seed is a NoCloud disk, not Azure's.
    datasource_list: [NoCloud, None]
    """
)


@dataclass(frozen=True)
class GuestImage:
    """A built OS disk with the kernel to boot it and the key that logs in as root."""

    disk: Path
    kernel: Path
    initrd: Path
    ssh_key: Path


def _digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _rootfs_inputs() -> dict:
    return {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES}


def _image_inputs() -> dict:
    return {
        **_rootfs_inputs(),
        "size": ROOT_SIZE,
        "equivs": EQUIVS_PACKAGES,
        "files": [UDEV_RULE, CLOUD_CFG],
        "builder": Path(__file__).read_text(encoding="utf-8"),
    }


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def _equivs_repo(repo: Path, work: Path) -> None:
    repo.mkdir(parents=True)
    for name, (depends, description) in EQUIVS_PACKAGES.items():
        control = work / f"{name}.control"
        lines = [
            "Section: misc",
            "Priority: optional",
            "Standards-Version: 4.6.2",
            f"Package: {name}",
            "Version: 1:0.0-chroma-test",
            "Architecture: all",
        ]
        if depends:
            lines.append(f"Depends: {depends}")
        lines.append(f"Description: test stand-in for {name}\n {description}")
        control.write_text("\n".join(lines) + "\n", encoding="utf-8")
        _run(["equivs-build", str(control)], cwd=work, capture_output=True)
    for deb in work.glob("*.deb"):
        shutil.move(deb, repo / deb.name)
    packages = _run(["dpkg-scanpackages", "--multiversion", "."], cwd=repo, capture_output=True, text=True).stdout
    (repo / "Packages").write_text(packages, encoding="utf-8")


def _customize(rootfs: Path, work: Path, public_key: str) -> None:
    _write(rootfs / "etc/udev/rules.d/66-chroma-test-azure-links.rules", UDEV_RULE)
    _write(rootfs / "etc/cloud/cloud.cfg.d/90-chroma-test.cfg", CLOUD_CFG)
    _write(rootfs / "root/.ssh/authorized_keys", public_key, 0o600)
    (rootfs / "root/.ssh").chmod(0o700)
    # apt reaches nothing but the local repo: cloud-init's package_update and packages run offline.
    for sources in [rootfs / "etc/apt/sources.list", *(rootfs / "etc/apt/sources.list.d").glob("*")]:
        sources.unlink(missing_ok=True)
    _write(rootfs / "etc/apt/sources.list.d/chroma-test.list", f"deb [trusted=yes] file:{LOCAL_REPO} ./\n")
    _equivs_repo(rootfs / LOCAL_REPO.lstrip("/"), work)
    shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
    _write(rootfs / "etc/apt/apt.conf.d/90chroma-test-no-translations", 'Acquire::Languages "none";\n')
    # What Ubuntu's cloud image has done before it is published: networkd on (netplan renders to
    # it), and the first-boot caches (linker, hwdb, journal catalog) built.
    for command in (
        ["systemctl", "enable", "systemd-networkd.service"],
        ["ldconfig"],
        ["systemd-hwdb", "update"],
        ["journalctl", "--update-catalog"],
        ["/usr/lib/systemd/systemd-update-done"],
    ):
        _run(["chroot", str(rootfs), *command], capture_output=True)
    (rootfs / "etc/hostname").write_text("localhost\n", encoding="utf-8")
    (rootfs / "etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n", encoding="utf-8")


def _rootfs_tar(progress) -> Path:
    """Debian's packages as mmdebstrap installs them, cached apart: the slow, network part of the build."""
    tar = CACHE_ROOT / f"rootfs-{_digest(_rootfs_inputs())}.tar"
    if tar.exists():
        return tar
    progress(f"mmdebstrap {SUITE} (a few minutes on a busy machine) -> {tar}")
    partial = tar.with_suffix(".partial")
    _run(["mmdebstrap", "--quiet", "--variant=apt", f"--include={','.join(PACKAGES)}", SUITE, str(partial), MIRROR])
    partial.rename(tar)
    return tar


def _preload_images(rootfs: Path, images_dir: Path) -> None:
    """The registry's stand-in: the images in the guest's /var/lib/docker, under the pinned names.

    A dockerd on the host, with the guest's /var/lib/docker as its data root, loads each tar and
    tags it; the guest's own dockerd (Debian 13's) then finds them there, and compose pulls nothing.
    """
    runtime_dir = Path(tempfile.mkdtemp(prefix="guest-dockerd-", dir="/tmp"))  # short: it holds sockets
    data_root = rootfs / "var/lib/docker"
    host = f"unix://{runtime_dir}/docker.sock"
    pidfile = runtime_dir / "dockerd.pid"
    with (runtime_dir / "dockerd.log").open("w") as log:
        dockerd = subprocess.Popen(
            ["dockerd", f"--host={host}", f"--pidfile={pidfile}", f"--data-root={data_root}",
             f"--exec-root={runtime_dir}/exec", "--bridge=none", "--iptables=false", "--ip-masq=false",
             "--storage-driver=overlay2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    docker = ["docker", "--host", host]
    try:
        deadline = time.monotonic() + DOCKERD_START_SECONDS
        while subprocess.run([*docker, "version"], capture_output=True, check=False).returncode != 0:
            if dockerd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"dockerd for the guest image did not start: {(runtime_dir / 'dockerd.log').read_text()}"
                )
            time.sleep(0.5)
        names = []
        for line in (images_dir / "images.list").read_text(encoding="utf-8").splitlines():
            tar, name = line.split()
            _run([*docker, "load", "--quiet", "--input", str(images_dir / tar)], capture_output=True)
            image_id = (images_dir / f"{tar}.id").read_text(encoding="utf-8").strip()
            _run([*docker, "tag", image_id, name])
            names.append(name)
        listed = _run([*docker, "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True, text=True)
        for extra in set(listed.stdout.split()) - set(names):
            _run([*docker, "rmi", "--no-prune", extra], capture_output=True)
    finally:
        dockerd.terminate()
        dockerd.wait(timeout=60)
        shutil.rmtree(runtime_dir, ignore_errors=True)
    # The host engine's networks and containerd state are not the guest's.
    for leftover in ("network", "containerd", "runtimes", "tmp", "buildkit"):
        shutil.rmtree(data_root / leftover, ignore_errors=True)


def build(images_dir: Path, progress=print) -> GuestImage:
    """The cached guest image for the current inputs and images, building it first when there is none."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    target = CACHE_ROOT / f"image-{_digest({**_image_inputs(), 'images': images_dir.name})}"
    image = GuestImage(target / "root.img", target / "vmlinuz", target / "initrd.img", target / "id_ed25519")
    if (target / "done").exists():
        return image
    tar = _rootfs_tar(progress)
    staging = Path(tempfile.mkdtemp(prefix="building-", dir=CACHE_ROOT))
    try:
        rootfs = staging / "rootfs"
        rootfs.mkdir()
        progress(f"building the guest image in {staging}")
        _run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", str(rootfs), "-xpf", str(tar)])
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "chroma-vm-test", "-f", str(staging / "id_ed25519")])
        _customize(rootfs, staging, (staging / "id_ed25519.pub").read_text(encoding="utf-8"))
        _preload_images(rootfs, images_dir)
        shutil.copy(sorted((rootfs / "boot").glob("vmlinuz-*"))[-1], staging / "vmlinuz")
        shutil.copy(sorted((rootfs / "boot").glob("initrd.img-*"))[-1], staging / "initrd.img")
        _run(
            [
                "mke2fs",
                "-q",
                "-E",
                "root_owner=0:0",
                "-t",
                "ext4",
                "-L",
                "root",
                "-d",
                str(rootfs),
                str(staging / "root.img"),
                ROOT_SIZE,
            ]
        )
        shutil.rmtree(rootfs)
        (staging / "done").write_text("", encoding="utf-8")
        for stale in CACHE_ROOT.glob("image-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return image
