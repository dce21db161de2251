"""The VM's files as its rendered cloud-config writes them, and loop devices to run them against.

Every runtime test takes its files from here, so none of them reads a hand-kept copy: the
cloud-config is rendered by the same function the VM's is, and parsed back with `write_files`, and
the proxy config and compose file by the same function as the VM's run command.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from components import cloud_config, runtime, runtime_config
from components.runtime import AUTHORIZATION, OtelSettings

ROOT = Path(__file__).resolve().parent.parent
FQDN = "chroma-test.westeurope.cloudapp.azure.com"
TOKEN = "RuntimeTestToken0123456789abcdefghij"
ACME_EMAIL = "ops@example.com"
# Big enough for ext4 and a small Chroma database; sparse, so it costs nothing until written.
DISK_SIZE_BYTES = 64 * 1024 * 1024


def pinned_chroma_version() -> str:
    """ChromaVersion's one default, from Pulumi.yaml."""
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text(encoding="utf-8"))
    return project["config"]["chromaVersion"]["default"]


def vm_files(auth_header: str = AUTHORIZATION, otel: OtelSettings | None = None) -> dict[str, str]:
    """Path -> content of what the VM holds once running: the cloud-config's files, then the run command's."""
    runtime_files = runtime_config.render_runtime_files(
        site=runtime_config.vm_site(FQDN),
        chroma_version=pinned_chroma_version(),
        auth_header=auth_header,
        token=TOKEN,
        otel=otel,
        acme_email=ACME_EMAIL,
    )
    return {
        **cloud_config.write_files(cloud_config.render_cloud_config()),
        cloud_config.CADDYFILE: runtime_files.caddyfile,
        cloud_config.TOKEN_FILE: runtime.token_file_content(runtime_files.token),
        cloud_config.COMPOSE_FILE: runtime_files.compose,
    }


def compose_service(files: dict[str, str], service: str) -> dict:
    """One service of the rendered compose file."""
    return yaml.safe_load(files[cloud_config.COMPOSE_FILE])["services"][service]


def unescape_compose(value: str) -> str:
    """What compose hands the container: `$$` in the file is a literal `$`."""
    return value.replace("$$", "$")


def chroma_environment(files: dict[str, str]) -> dict[str, str]:
    """The environment the VM's compose file gives the chroma container."""
    return {key: unescape_compose(str(value)) for key, value in compose_service(files, "chroma")["environment"].items()}


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section -> key -> every value given (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if section := re.fullmatch(r"\[(.+)\]", line):
            current = sections.setdefault(section.group(1), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(files: dict[str, str], name: str) -> dict[str, dict[str, list[str]]]:
    """One of the VM's rendered systemd units, parsed."""
    return unit_settings(files[f"{cloud_config.UNIT_DIR}/{name}"])


def unit_environment(settings: dict[str, dict[str, list[str]]]) -> dict[str, str]:
    """A service's Environment= assignments (space-separated KEY=value pairs, none quoted here)."""
    pairs = " ".join(settings["Service"].get("Environment", [])).split()
    return dict(pair.split("=", 1) for pair in pairs)


def need_root_and_loop_devices() -> None:
    """Skips, saying why, where loop devices cannot be made; CI runs as root and has them."""
    if os.geteuid() != 0:
        pytest.skip("needs root for losetup, mkfs and mount; CI runs as root")
    for tool in ("losetup", "blkid", "mkfs.ext4", "mkfs.ext3", "mkswap", "sfdisk", "findmnt", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (util-linux, fdisk, e2fsprogs); .ci/run must install it")
    if not Path("/dev/loop-control").exists():
        pytest.skip("this machine has no /dev/loop-control, so no loop devices")


@contextlib.contextmanager
def loop_device(image: Path, size: int = DISK_SIZE_BYTES) -> Iterator[str]:
    """A loop device over a sparse image file; detached on exit, even after a failure."""
    need_root_and_loop_devices()
    with image.open("wb") as handle:
        handle.truncate(size)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


@contextlib.contextmanager
def mounted(device: str, where: Path, fs_type: str, options: str) -> Iterator[Path]:
    """`device` mounted at `where` the way a mount unit's Type= and Options= say; unmounted on exit."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", fs_type, "-o", options, device, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def probe(device: str) -> dict[str, str]:
    """What blkid reads on the device itself (no cache, no udev)."""
    result = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True, text=True, check=False)
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
