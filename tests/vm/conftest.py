"""Session fixtures of the VM tier: the tools, the guest image, the stand-in images, pebble and the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import acme_server
import guest_image
import guest_registry
import images
import pytest
import user_data
from live import free_port
from machine import Forwards

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "build" / "vm-report.json"
TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "mke2fs": "e2fsprogs",
    "equivs-build": "equivs",
    "dpkg-scanpackages": "dpkg-dev",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "socat": "socat",
    "pebble": "pebble",
    "pebble-challtestsrv": "pebble",
    "ssh": "openssh-client",
    "openssl": "openssl",
}


@pytest.fixture(scope="session")
def vm_tools() -> None:
    """Skips the tier, naming what to install, when a tool it runs is missing."""
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        pytest.skip(f"the VM tier needs: apt-get install {' '.join(missing)} (.ci/run installs them)")


@pytest.fixture(scope="session")
def vm_workdir() -> Iterator[Path]:
    """A scratch folder for the session's disks, seeds, serial logs and pebble; removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="chroma-vm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def guest(vm_tools, images_dir) -> guest_image.GuestImage:
    """The OS image every guest boots from, with the stand-in images preloaded."""
    started = time.monotonic()
    image = guest_image.build(images_dir, progress=lambda text: print(f"\n{text}", flush=True))
    print(f"\nguest image ready in {time.monotonic() - started:.0f}s: {image.disk.parent}")
    return image


@pytest.fixture(scope="session")
def forwards() -> Forwards:
    """Host ports for the session's guests (one guest runs at a time) and for pebble."""
    return Forwards(ssh=free_port(), http=free_port(), https=free_port(), acme=free_port())


@pytest.fixture(scope="session")
def acme(vm_tools, vm_workdir, forwards) -> Iterator[acme_server.Pebble]:
    """Pebble for the whole session: one root, and a memory of every order across the guests."""
    server = acme_server.start(
        vm_workdir,
        port=forwards.acme,
        management_port=free_port(),
        dns_port=free_port(),
        http_port=forwards.http,
        https_port=forwards.https,
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def images_dir(vm_tools, docker_engine, standin_images) -> Path:
    """The stand-in images (tests/images.py) as tars, for the guest image to preload.

    Besides what the compose file runs: the Chroma stand-in of user_data.OTHER_CHROMA_VERSION, which the
    version change finds already there, as a pull would leave it.
    """
    started = time.monotonic()
    other_name, other_id = images.ensure_chroma_image(docker_engine, user_data.OTHER_CHROMA_VERSION)
    built = {**standin_images.images, other_name: other_id}
    needed = [*guest_registry.compose_images(user_data.runtime_files().compose), other_name]
    path = guest_registry.guest_images_dir(docker_engine, built, acme_server.listener_ca()[0], needed)
    print(f"\nstand-in images ready in {time.monotonic() - started:.0f}s: {path}")
    return path


class VmReport:
    """build/vm-report.json: for each scenario, whether it passed and its phases in seconds."""

    def __init__(self) -> None:
        self.scenarios: dict[str, dict] = {}

    def phases(self, scenario: str) -> dict[str, float]:
        """The phase table of a scenario (created failed; `passed` marks it done)."""
        return self._entry(scenario)["phases"]

    def details(self, scenario: str) -> dict:
        """What else a scenario found, beside its phases."""
        return self._entry(scenario).setdefault("details", {})

    def _entry(self, scenario: str) -> dict:
        return self.scenarios.setdefault(scenario, {"passed": False, "phases": {}})

    def passed(self, scenario: str) -> None:
        """Marks a scenario passed and prints its phases."""
        self.scenarios[scenario]["passed"] = True

    def write(self) -> None:
        """Writes the report and prints the timeline."""
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(json.dumps({"scenarios": self.scenarios}, indent=2) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def vm_report() -> Iterator[VmReport]:
    """The session's report, written at the end whatever happened."""
    report = VmReport()
    yield report
    report.write()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/vm/ is in the vm tier."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vm)


def run(command: list[str]) -> str:
    """Runs a host command, failing the test with its output."""
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stdout}{result.stderr}"
    return result.stdout
