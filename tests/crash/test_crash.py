"""The crash tier: real `chroma run` servers killed with -9 and copied live, then the project's recovery.

Each kind of crash runs on two servers side by side: one as the project runs Chroma (write log
kept from the first write), and a control with Chroma's default config. After every crash:
- the crashed data is checked as it is (a plain restart): `broken_before_repair`;
- the project's own recovery runs on it (`chroma_data.py before-start`, then `after-start`),
  and every acknowledged write, update and delete is checked, with exact embeddings and
  queries by each sampled record's own vector: `whole_after_repair`;
- the control restarts plainly and is checked the same way: its losses.
The numbers go to build/crash-report.json.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import time
from concurrent import futures
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.crash.harness import (
    COLLECTION_NAMES,
    ROOT,
    Ledger,
    Server,
    Writer,
    check_server,
    chroma_data,
    copy_data,
    remove,
    running,
    settle,
    start_server,
)

pytestmark = pytest.mark.crash

KILL9_ITERATIONS = 30
SNAPSHOT_ITERATIONS = 20
REPORT = ROOT / "build" / "crash-report.json"


def write_report(kind: str, section: dict) -> None:
    """Adds one kind's numbers to build/crash-report.json, keeping the other kind's."""
    REPORT.parent.mkdir(exist_ok=True)
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report[kind] = section
    report["chroma_version"] = chroma_data_version()
    REPORT.write_text(json.dumps(report, indent=2) + "\n")


def chroma_data_version() -> str:
    from importlib.metadata import version

    return version("chromadb")


def quiet_main(argv: list[str], capsys) -> tuple[int, str]:
    """chroma_data.py's main, with its output captured for the test's failure message."""
    code = chroma_data.main(argv)
    return code, capsys.readouterr().out


def project_recovery(data_dir: Path, workdir: Path, capsys) -> tuple[Server, float, str]:
    """What the VM and the local stack do at start: before-start, start Chroma, after-start."""
    started = time.monotonic()
    code, before = quiet_main(["before-start", str(data_dir)], capsys)
    assert code == 0, before
    repair_seconds = time.monotonic() - started
    server = start_server(data_dir, workdir)
    started = time.monotonic()
    code, after = quiet_main(["after-start", str(data_dir), "--endpoint", server.url], capsys)
    repair_seconds += time.monotonic() - started
    return server, repair_seconds, before + after + f"after-start exit {code}\n"


def as_is(copy: Path, workdir: Path, ledger: Ledger) -> list[str]:
    """A plain restart of a copy of the crashed data: what clients would get without the repair."""
    try:
        with running(copy, workdir) as server:
            return check_server(server, ledger)
    except RuntimeError as error:
        return [f"did not start: {error}"]
    finally:
        remove(copy)
        remove(workdir)


def control_restart(data_dir: Path, workdir: Path, ledger: Ledger) -> list[str]:
    """Chroma's default config after the same crash, restarted as it is: what it got wrong."""
    try:
        with running(data_dir, workdir) as server:
            return check_server(server, ledger)
    except RuntimeError as error:
        return [f"did not start: {error}"]


class ControlLosses:
    """What Chroma's default config lost over a crash kind: copies affected, collections, records."""

    def __init__(self) -> None:
        self.iterations = self.broken = self.unreadable_collections = self.lost_or_wrong_records = 0

    def add(self, problems: list[str]) -> None:
        self.iterations += 1
        self.broken += bool(problems)
        for problem in problems:
            words = problem.split(": ", 1)[-1].split()
            if words and words[0].isdigit() and "records" in problem:
                self.lost_or_wrong_records += int(words[0])
            else:
                self.unreadable_collections += 1

    def report(self) -> dict[str, int]:
        return dict(vars(self))


def summary(iterations: int, broken: int, whole: int, seconds: list[float]) -> dict:
    return {
        "iterations": iterations,
        "broken_before_repair": broken,
        "whole_after_repair": whole,
        "repair_seconds": {"median": round(statistics.median(seconds), 3), "max": round(max(seconds), 3)},
    }


def test_kill9_during_writes_is_repaired_whole(tmp_path: Path, capsys) -> None:
    rng = random.Random(17)
    project_dir, control_dir = tmp_path / "project", tmp_path / "control"
    project_ledger, control_ledger = Ledger(), Ledger()
    project = start_server(project_dir, tmp_path / "project-run")
    chroma_data.keep_log(project_dir)  # as after-start does before the proxy opens
    control = start_server(control_dir, tmp_path / "control-run")
    broken_before, whole_after, seconds, failures = 0, 0, [], []
    control_losses = ControlLosses()
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        for iteration in range(KILL9_ITERATIONS):
            with (
                Writer(project, project_ledger, COLLECTION_NAMES, seed=iteration),
                Writer(control, control_ledger, COLLECTION_NAMES, seed=1000 + iteration),
            ):
                time.sleep(rng.uniform(0.4, 1.6))
                project.kill9()
                control.kill9()
            expected = project_ledger.copy()
            copy_data(project_dir, tmp_path / f"as-is-data-{iteration}")
            before = pool.submit(as_is, tmp_path / f"as-is-data-{iteration}", tmp_path / f"as-is-{iteration}", expected)
            controlled = pool.submit(control_restart, control_dir, tmp_path / f"control-{iteration}", control_ledger)
            project, repair_seconds, recovery_log = project_recovery(project_dir, tmp_path / f"run-{iteration}", capsys)
            seconds.append(repair_seconds)
            problems = check_server(project, expected, seed=iteration)
            if before.result():
                broken_before += 1
            if problems:
                failures.append(f"kill -9 #{iteration}: {problems}\n{recovery_log}")
            else:
                whole_after += 1
            # The server the recovery started carries on: later crashes hit a repaired directory.
            project_ledger = settle(project, expected)
            problems = controlled.result()
            control_losses.add(problems)
            if problems:
                remove(control_dir)  # the next control crash starts from a healthy directory
                control_ledger = Ledger()
            control = start_server(control_dir, tmp_path / f"control-run-{iteration}")
    project.kill9()
    control.kill9()
    report = summary(KILL9_ITERATIONS, broken_before, whole_after, seconds)
    report["control_default_config"] = control_losses.report()
    report["acknowledged_write_requests"] = project_ledger.acknowledged_writes
    write_report("kill9", report)
    assert not failures, "\n".join(failures)
    assert whole_after == KILL9_ITERATIONS


# ---------------------------------------------------------------------------------------------
# Crash-consistent copies of a live server's filesystem


def _need(condition: bool, reason: str) -> None:
    if not condition:
        pytest.skip(reason)


def _run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


class PausableDisk:
    """An ext4 filesystem on a loop device whose backing file sits on a bindfs (FUSE) passthrough.

    SIGSTOP on bindfs freezes every write on its way to the backing file; the backing file then
    holds exactly what a power cut at that moment would leave (the loop filesystem's page cache
    is not in it). `snapshot` copies it, like an Azure disk snapshot of a running VM.
    """

    SIZE = "512M"

    def __init__(self, workdir: Path, stack: ExitStack) -> None:
        self.backing, self.passthrough, self.mountpoint = workdir / "backing", workdir / "fuse", workdir / "fs"
        for folder in (self.backing, self.passthrough, self.mountpoint):
            folder.mkdir(parents=True)
        self.bindfs = subprocess.Popen(["bindfs", "-f", str(self.backing), str(self.passthrough)])
        stack.callback(self._stop_bindfs)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.passthrough):
            assert time.monotonic() < deadline, "bindfs did not mount"
            time.sleep(0.1)
        image = self.passthrough / "disk.img"
        _run("truncate", "-s", self.SIZE, str(image))
        _run("mkfs.ext4", "-q", "-F", str(image))
        self.loop = _run("losetup", "--find", "--show", str(image))
        stack.callback(_run, "losetup", "-d", self.loop)
        _run("mount", self.loop, str(self.mountpoint))
        stack.callback(_run, "umount", str(self.mountpoint))

    def _stop_bindfs(self) -> None:
        with_suppressed = subprocess.run(["fusermount3", "-u", str(self.passthrough)], check=False)
        if with_suppressed.returncode != 0:
            self.bindfs.send_signal(signal.SIGTERM)
        self.bindfs.wait(timeout=30)

    def snapshot(self, target: Path, during_pause) -> object:
        """Copies the backing file while bindfs is paused; `during_pause()` runs inside the pause."""
        os.kill(self.bindfs.pid, signal.SIGSTOP)
        try:
            result = during_pause()
            _run("cp", "--sparse=always", str(self.backing / "disk.img"), str(target))
        finally:
            os.kill(self.bindfs.pid, signal.SIGCONT)
        return result


def restore(image: Path, target: Path) -> None:
    """Mounts a snapshot image as a restored disk (ext4 replays its journal) and copies its files out."""
    mountpoint = image.with_suffix(".mnt")
    mountpoint.mkdir()
    loop = _run("losetup", "--find", "--show", str(image))
    try:
        _run("mount", loop, str(mountpoint))
        try:
            for name in ("project", "control"):
                copy_data(mountpoint / name, target / name)
        finally:
            _run("umount", str(mountpoint))
    finally:
        _run("losetup", "-d", loop)
        image.unlink()


def test_crash_consistent_copies_are_repaired_whole(tmp_path: Path, capsys) -> None:
    _need(os.geteuid() == 0, "needs root for loop devices and mounts")
    _need(shutil.which("bindfs") is not None, "bindfs is not installed (apt-get install bindfs fuse3)")
    _need(Path("/dev/fuse").exists(), "no /dev/fuse on this machine")
    rng = random.Random(20)
    copies: list[tuple[Path, Ledger, Ledger]] = []
    project_ledger, control_ledger = Ledger(), Ledger()
    with ExitStack() as stack:
        disk = PausableDisk(tmp_path / "disk", stack)
        project_dir, control_dir = disk.mountpoint / "project", disk.mountpoint / "control"
        project = start_server(project_dir, tmp_path / "project-run")
        stack.callback(project.kill9)
        chroma_data.keep_log(project_dir)
        control = start_server(control_dir, tmp_path / "control-run")
        stack.callback(control.kill9)
        with (
            Writer(project, project_ledger, COLLECTION_NAMES, seed=1) as project_writer,
            Writer(control, control_ledger, COLLECTION_NAMES, seed=2) as control_writer,
        ):
            for iteration in range(SNAPSHOT_ITERATIONS):
                time.sleep(rng.uniform(0.3, 1.0))
                image = tmp_path / f"snapshot-{iteration}.img"
                ledgers = disk.snapshot(image, lambda: (project_writer.snapshot(), control_writer.snapshot()))
                copies.append((image, *ledgers))
    broken_before, whole_after, seconds, failures = 0, 0, [], []
    control_losses = ControlLosses()
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        for iteration, (image, project_expected, control_expected) in enumerate(copies):
            restored = tmp_path / f"restored-{iteration}"
            restore(image, restored)
            copy_data(restored / "project", tmp_path / f"as-is-data-{iteration}")
            before = pool.submit(
                as_is, tmp_path / f"as-is-data-{iteration}", tmp_path / f"as-is-{iteration}", project_expected
            )
            controlled = pool.submit(
                control_restart, restored / "control", tmp_path / f"control-{iteration}", control_expected
            )
            server, repair_seconds, recovery_log = project_recovery(
                restored / "project", tmp_path / f"run-{iteration}", capsys
            )
            try:
                problems = check_server(server, project_expected, seed=iteration)
            finally:
                server.kill9()
            seconds.append(repair_seconds)
            broken_before += bool(before.result())
            if problems:
                failures.append(f"snapshot #{iteration}: {problems}\n{recovery_log}")
            else:
                whole_after += 1
            control_losses.add(controlled.result())
            remove(restored)
    report = summary(SNAPSHOT_ITERATIONS, broken_before, whole_after, seconds)
    report["control_default_config"] = control_losses.report()
    report["acknowledged_write_requests"] = project_ledger.acknowledged_writes
    write_report("snapshot", report)
    assert len(copies) == SNAPSHOT_ITERATIONS
    assert not failures, "\n".join(failures)
    assert whole_after == SNAPSHOT_ITERATIONS
