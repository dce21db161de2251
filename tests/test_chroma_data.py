"""scripts/chroma_data.py and cloud-init/chroma-start.sh against a real `chroma run` at the pinned version.

The broken indexes here are made the way crashes make them (a truncated file; an index folder
older than SQLite's record), and each repair is judged by whether every acknowledged record comes
back with its exact embedding.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from components import runtime
from components.runtime import AUTHORIZATION, X_CHROMA_TOKEN
from tests.crash.harness import (
    CHROMA_RUN,
    COLLECTION_NAMES,
    ROOT,
    Ledger,
    Server,
    Writer,
    check_server,
    chroma_data,
    start_server,
)
from tests.live import IMAGE_CONFIG, LOOPBACK, free_port, port_open, tls_proxy, wait_until

TOOL = ROOT / "scripts" / "chroma_data.py"
START_SCRIPT = ROOT / "cloud-init" / "chroma-start.sh"
TOKEN = "ChromaDataTestToken0123456789abcdefghij"


def tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The data tool as an operator runs it: `python3 chroma_data.py ...`, standard library only."""
    return subprocess.run(
        [sys.executable, "-I", str(TOOL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": os.environ["PATH"], **(env or {})},
        check=False,
    )


def write_some(data_dir: Path, workdir: Path, seconds: float, keep_log: bool = True) -> Ledger:
    """A server that writes for a while and stops cleanly; returns what it acknowledged."""
    ledger = Ledger()
    server = start_server(data_dir, workdir)
    try:
        if keep_log:
            chroma_data.keep_log(data_dir)
        with Writer(server, ledger, COLLECTION_NAMES, seed=3):
            time.sleep(seconds)
    finally:
        assert server.stop() == 0
    return ledger


def assert_whole(data_dir: Path, workdir: Path, ledger: Ledger) -> None:
    """A fresh server on the data serves every acknowledged write exactly."""
    server = start_server(data_dir, workdir)
    try:
        assert check_server(server, ledger) == []
    finally:
        server.stop()


def vector_folders(data_dir: Path) -> list[Path]:
    return sorted(path for path in data_dir.iterdir() if path.is_dir() and path.name != chroma_data.MOVED_ASIDE_DIR)


def purge_flag(data_dir: Path) -> bool | None:
    """Chroma's automatically_purge as stored in SQLite (None: no row, which means purge)."""
    with sqlite3.connect(data_dir / "chroma.sqlite3") as db:
        row = db.execute("SELECT config_json_str FROM embeddings_queue_config WHERE id = 1").fetchone()
    return None if row is None else json.loads(row[0])["automatically_purge"]


def test_the_tool_needs_only_the_standard_library():
    imported = subprocess.run(
        [sys.executable, "-I", "-c", f"import runpy, sys; sys.argv = ['x', '--help']; runpy.run_path({str(TOOL)!r})"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    for line in TOOL.read_text().splitlines():
        if line.startswith(("import ", "from ")) and "__future__" not in line:
            module = line.split()[1].split(".")[0]
            assert module in sys.stdlib_module_names, f"{line!r}: the VM host has only Python's standard library"


def test_keep_log_sets_the_flag_on_a_running_server_and_is_idempotent(tmp_path):
    data_dir = tmp_path / "data"
    server = start_server(data_dir, tmp_path / "run")
    try:
        assert purge_flag(data_dir) is not False, "Chroma's default purges the log"
        first = tool("keep-log", str(data_dir))
        second = tool("keep-log", str(data_dir))
    finally:
        server.stop()
    assert first.returncode == second.returncode == 0, first.stdout + second.stdout
    assert "keep-log: set" in first.stdout
    assert "already set" in second.stdout
    assert purge_flag(data_dir) is False


def test_the_log_is_kept_while_chroma_writes_past_its_sync_threshold(tmp_path):
    """With the flag, every acknowledged write stays in embeddings_queue; without it, Chroma purges."""
    kept, purged = tmp_path / "kept", tmp_path / "purged"
    kept_ledger = write_some(kept, tmp_path / "kept-run", 3.0)
    write_some(purged, tmp_path / "purged-run", 3.0, keep_log=False)
    with sqlite3.connect(kept / "chroma.sqlite3") as db:
        logged = db.execute("SELECT COUNT(*) FROM embeddings_queue").fetchone()[0]
    records = sum(len(records) for records in kept_ledger.records.values())
    assert logged >= records > 0
    for segment in chroma_data.vector_segments(kept):
        assert chroma_data.log_gaps(kept, segment) == 0, segment.collection_name
    assert any(chroma_data.log_gaps(purged, segment) for segment in chroma_data.vector_segments(purged)), (
        "Chroma's default config should purge the log; if it no longer does, the repair's refusal is moot"
    )


def test_repair_refuses_when_the_log_is_not_kept(tmp_path):
    data_dir = tmp_path / "data"
    write_some(data_dir, tmp_path / "run", 2.0, keep_log=False)
    before = vector_folders(data_dir)
    result = tool("repair", str(data_dir), "--all")
    assert result.returncode == 1
    assert "keep-log" in result.stdout
    assert "would be lost" in result.stdout
    assert vector_folders(data_dir) == before, "a refused repair moves nothing"


def test_repair_moves_only_the_broken_index_aside_and_chroma_rebuilds_it_whole(tmp_path):
    data_dir = tmp_path / "data"
    ledger = write_some(data_dir, tmp_path / "run", 3.0)
    healthy = tool("repair", str(data_dir))
    assert healthy.returncode == 0, healthy.stdout
    assert "0 vector indexes moved" in healthy.stdout, "a healthy index stays where it is"
    broken = vector_folders(data_dir)[0]
    level0 = broken / "data_level0.bin"
    with level0.open("r+b") as handle:  # what a crash before the page cache was written leaves
        handle.truncate(level0.stat().st_size // 2)
    result = tool("repair", str(data_dir))
    assert result.returncode == 0, result.stdout
    assert "1 vector indexes moved aside" in result.stdout
    assert "data_level0.bin" in result.stdout, "the reason is printed"
    moved = list((data_dir / chroma_data.MOVED_ASIDE_DIR).glob(f"*/{broken.name}"))
    assert len(moved) == 1
    assert (moved[0] / "data_level0.bin").exists(), "moved, never deleted"
    assert moved[0].stat().st_dev == data_dir.stat().st_dev
    assert_whole(data_dir, tmp_path / "after", ledger)


def test_repair_finds_an_index_older_than_sqlite_the_case_that_fails_silently(tmp_path):
    data_dir, old = tmp_path / "data", tmp_path / "old-index"
    write_some(data_dir, tmp_path / "run-1", 2.0)
    folder = vector_folders(data_dir)[0]
    shutil.copytree(folder, old)
    ledger = Ledger()
    server = start_server(data_dir, tmp_path / "run-2")
    with Writer(server, ledger, COLLECTION_NAMES, seed=9):
        time.sleep(3.0)
    server.stop()
    shutil.rmtree(folder)
    shutil.copytree(old, folder)
    assert "behind SQLite's record" in chroma_data.index_problem(
        data_dir, next(s for s in chroma_data.vector_segments(data_dir) if s.segment_id == folder.name)
    )
    assert tool("repair", str(data_dir)).returncode == 0
    assert not folder.exists()


def verify_on(data_dir: Path, workdir: Path) -> subprocess.CompletedProcess:
    """The data tool's verify against a fresh server on the data."""
    server = start_server(data_dir, workdir)
    try:
        return tool("verify", "--endpoint", server.url)
    finally:
        server.stop()


def test_verify_names_a_broken_collection_and_passes_a_whole_one(tmp_path):
    data_dir = tmp_path / "data"
    write_some(data_dir, tmp_path / "run", 3.0)
    whole = verify_on(data_dir, tmp_path / "whole")
    assert whole.returncode == 0, whole.stdout
    assert f"{len(COLLECTION_NAMES)} of {len(COLLECTION_NAMES)} collections whole" in whole.stdout
    broken = vector_folders(data_dir)[0]
    (broken / "header.bin").write_bytes(b"")
    name = next(s.collection_name for s in chroma_data.vector_segments(data_dir) if s.segment_id == broken.name)
    result = verify_on(data_dir, tmp_path / "broken")
    assert result.returncode == 1, result.stdout
    assert f"BROKEN default_database/{name}" in result.stdout


@pytest.mark.parametrize("auth_header", [AUTHORIZATION, X_CHROMA_TOKEN])
def test_verify_goes_through_the_proxy_with_the_token_and_never_prints_it(tmp_path, auth_header):
    data_dir = tmp_path / "data"
    write_some(data_dir, tmp_path / "run", 1.0)
    server = start_server(data_dir, tmp_path / "serve")
    try:
        with tls_proxy(tmp_path / "proxy", f"{LOOPBACK}:{server.port}", auth_header, TOKEN) as (site, caddy):
            endpoint = f"https://localhost:{site.https_port}"
            common = ["verify", "--endpoint", endpoint, "--ca-cert", str(caddy.local_ca), "--auth-header", auth_header]
            with_token = tool(*common, env={"CHROMA_TOKEN": TOKEN})
            flag_token = tool(*common, "--token", TOKEN)
            without = tool(*common)
    finally:
        server.stop()
    assert with_token.returncode == 0, with_token.stdout
    assert flag_token.returncode == 0, flag_token.stdout
    assert without.returncode == 1
    assert "HTTP 401" in without.stdout
    for result in (with_token, flag_token, without):
        assert TOKEN not in result.stdout + result.stderr


def test_a_bad_endpoint_is_a_usage_error():
    result = tool("verify", "--endpoint", "ftp://example")
    assert result.returncode == 2
    assert "https://host[:port]" in result.stdout


# ---------------------------------------------------------------------------------------------
# The start handshake, as both targets run it: chroma-start.sh in Chroma's container, the guard beside it


@contextlib.contextmanager
def guard(data_dir: Path, url: str, log: Path):
    process = subprocess.Popen(
        [sys.executable, "-I", str(TOOL), "guard", str(data_dir), "--endpoint", url],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)


def start_container(
    data_dir: Path, workdir: Path, port: int, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """chroma-start.sh wrapping the real server, as the container's entrypoint runs it."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(IMAGE_CONFIG, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CHROMA_", "OTEL_"))}
    env |= {
        "CHROMA_DATA_DIR": str(data_dir),
        "CHROMA_PERSIST_PATH": str(data_dir),
        "CHROMA_PORT": str(port),
        "CHROMA_LISTEN_ADDRESS": LOOPBACK,
        "ANONYMIZED_TELEMETRY": "False",
        "CHROMA_APPROVAL_TIMEOUT_SECONDS": "60",
        # The first start's private port; in the container nothing else listens on the default.
        "CHROMA_BOOTSTRAP_PORT": str(free_port()),
        **(extra_env or {}),
    }
    return subprocess.Popen(
        ["bash", str(START_SCRIPT), *CHROMA_RUN, "run", str(workdir / "config.yaml")],
        env=env,
        stdout=(workdir / "container.log").open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def ready(data_dir: Path, previous: str = "") -> bool:
    """Whether the guard marked this start ready (the file names the start it answered)."""
    path = data_dir / runtime.READY_FILE
    return path.exists() and path.read_text() != previous


def ready_text(data_dir: Path) -> str:
    return (data_dir / runtime.READY_FILE).read_text()


def test_start_script_and_guard_keep_the_log_from_the_first_start_and_repair_after_a_kill(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    guard_log = tmp_path / "guard.log"
    with guard(data_dir, url, guard_log):
        container = start_container(data_dir, tmp_path / "c1", port)
        wait_until(lambda: ready(data_dir), 90, "the guard's ready file on a first start", container)
        assert purge_flag(data_dir) is False, "the log is kept before the proxy may open"
        ledger = Ledger()
        server = chroma_data_server(data_dir, port, container)
        with Writer(server, ledger, COLLECTION_NAMES, seed=5):
            time.sleep(3.0)
        os.killpg(container.pid, signal.SIGKILL)  # what `docker kill` and the OOM killer do
        container.wait()
        assert not (data_dir / chroma_data.CLEAN_MARKER).exists()

        previous = ready_text(data_dir)
        container = start_container(data_dir, tmp_path / "c2", port)
        wait_until(lambda: ready(data_dir, previous), 90, "the guard's ready file after a kill", container)
        text = guard_log.read_text()
        assert "no clean-shutdown marker" in text
        assert "rebuilt" in text
        assert "collections whole" in text
        assert list((data_dir / chroma_data.MOVED_ASIDE_DIR).iterdir()), "indexes moved aside, not deleted"
        assert check_server(chroma_data_server(data_dir, port, container), ledger) == []

        os.killpg(container.pid, signal.SIGTERM)  # docker stop
        assert container.wait(timeout=runtime.CHROMA_STOP_GRACE_SECONDS) == 0
        assert (data_dir / chroma_data.CLEAN_MARKER).exists(), "a clean stop leaves the marker"

        previous = ready_text(data_dir)
        container = start_container(data_dir, tmp_path / "c3", port)
        wait_until(lambda: ready(data_dir, previous), 90, "the guard's ready file after a clean stop", container)
        assert not (data_dir / chroma_data.CLEAN_MARKER).exists(), "removed before Chroma runs again"
        # The first start's database bootstrap stops cleanly too; the kill in between did not.
        assert guard_log.read_text().count("last stop was clean") == 2
        assert guard_log.read_text().count("guard: ready") == 3, "each start waited for the guard"
        assert check_server(chroma_data_server(data_dir, port, container), ledger) == []
        os.killpg(container.pid, signal.SIGTERM)
        container.wait(timeout=runtime.CHROMA_STOP_GRACE_SECONDS)


@contextlib.contextmanager
def approver(data_dir: Path):
    """Only the guard's first half: before-start, then approval. Whatever after-start would add is absent."""
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            request_file = data_dir / chroma_data.START_REQUEST
            if request_file.exists():
                request = request_file.read_text().strip()
                chroma_data.before_start(data_dir)
                (data_dir / chroma_data.START_APPROVED).write_text(request)
                request_file.unlink()
            time.sleep(0.1)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def test_the_log_is_kept_before_chroma_first_listens_where_clients_reach_it(tmp_path):
    """The flag protects only later writes, so on an empty disk it must be set before the real start."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = free_port()
    with approver(data_dir):
        container = start_container(data_dir, tmp_path / "c1", port)
        try:
            wait_until(lambda: port_open(port), 90, "Chroma on its real port", container)
            assert purge_flag(data_dir) is False, "a client could write before the log was kept"
            assert "first start: database created" in (tmp_path / "c1" / "container.log").read_text()
        finally:
            os.killpg(container.pid, signal.SIGTERM)
            container.wait(timeout=runtime.CHROMA_STOP_GRACE_SECONDS)


def test_before_start_keeps_the_log_only_after_deciding_on_a_repair(tmp_path):
    """An old disk whose log was purged: no repair (it would lose vectors), then the log is kept from now on."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    ledger = write_some(data_dir, tmp_path / "w", seconds=2.0, keep_log=False)
    assert purge_flag(data_dir) is not False
    chroma_data.before_start(data_dir)  # no clean-shutdown marker: this start counts as unclean
    assert not (data_dir / chroma_data.MOVED_ASIDE_DIR).exists(), "a repair without the log would lose vectors"
    assert purge_flag(data_dir) is False
    assert_whole(data_dir, tmp_path / "r", ledger)


def test_a_start_that_dies_before_answering_does_not_hold_up_the_next(tmp_path):
    """A bad version or setting, then Docker's restart or chroma-apply's rollback: the next start goes ahead."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = free_port()
    guard_log = tmp_path / "guard.log"
    with guard(data_dir, f"http://{LOOPBACK}:{port}", guard_log):
        # A running deployment, stopped cleanly, as a version or setting change stops it.
        container = start_container(data_dir, tmp_path / "c0", port)
        wait_until(lambda: ready(data_dir), 90, "the guard's ready file on a first start", container)
        os.killpg(container.pid, signal.SIGTERM)
        assert container.wait(timeout=runtime.CHROMA_STOP_GRACE_SECONDS) == 0
        previous = ready_text(data_dir)
        # A real failure: an empty OTel endpoint makes Chroma panic at start (chroma #4609).
        broken = start_container(data_dir, tmp_path / "c1", port, {"CHROMA_OPEN_TELEMETRY__ENDPOINT": ""})
        assert broken.wait(timeout=90) != 0
        started = time.monotonic()
        container = start_container(data_dir, tmp_path / "c2", port)
        wait_until(
            lambda: ready(data_dir, previous), 60, "the guard's ready file for the start after a failed one", container
        )
        assert time.monotonic() - started < chroma_data.HEARTBEAT_TIMEOUT_SECONDS / 5
        assert "never answered, and a newer start asks" in guard_log.read_text()
        os.killpg(container.pid, signal.SIGTERM)
        container.wait(timeout=runtime.CHROMA_STOP_GRACE_SECONDS)


def chroma_data_server(data_dir: Path, port: int, process: subprocess.Popen) -> Server:
    return Server(data_dir, port, process)


def test_the_start_script_and_the_guard_use_the_same_files():
    script = START_SCRIPT.read_text()
    for name in (chroma_data.START_REQUEST, chroma_data.START_APPROVED, chroma_data.READY, chroma_data.CLEAN_MARKER):
        assert f'"$data_dir/{name}"' in script, f"chroma-start.sh does not use {name}"
    assert chroma_data.READY == runtime.READY_FILE, "Chroma's health check waits for the guard's ready file"
    assert f"/{runtime.READY_FILE}" in runtime.CHROMA_HEALTHCHECK[-1]
