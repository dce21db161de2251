"""Measure how much RAM and disk the pinned Chroma server uses per embedding.

    python scripts/measure_memory.py --dimensions 384 --embeddings 100000 [--batch 5000] [--json]

It starts a real `chroma run` from the chromadb wheel in this environment, which must be the
version of `chromaVersion`'s default in Pulumi.yaml (the server the VM runs), on loopback with a
fresh data directory. It then:

1. takes the empty server's RSS and disk use as the baseline;
2. loads N random float32 vectors (ids only, no documents or metadata) through Chroma's client;
3. reads the RSS right after loading, and the peak RSS during loading (the kernel's high-water mark);
4. stops the server cleanly, starts it again on the same data, runs queries so that the index is
   loaded, and reads the RSS again: the steady state a long-running server settles at;
5. sums the bytes the data directory occupies on disk.

With --keep-write-log it first turns off the purge of Chroma's write log (`embeddings_queue`), as
a stack that keeps the log for recovery does, so the disk figure includes the log.

Every figure is reported as a total and per embedding, above the empty server's baseline. The
sizing model in components/sizing.py is fitted from a sweep of these runs (data/chroma_memory_sweep.json).
Results go to stdout (one JSON object with --json); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
HEARTBEAT_PATH = "/api/v2/heartbeat"
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 60.0
QUERY_COUNT = 20
# The server answers 413 Payload Too Large to a body over 40 MiB (probed here with bodies of every
# size), and the client sends float32 as base64: 5,000 x 3,072 was refused, 5,000 x 1,536 accepted.
# Batches are cut to at most this many floats.
MAX_FLOATS_PER_BATCH = 5000 * 1536
SEED = 11
# Chroma re-reads this row at each purge; with it, the write log is kept instead of purged.
KEEP_WRITE_LOG_SQL = (
    "INSERT OR REPLACE INTO embeddings_queue_config (id, config_json_str) VALUES "
    '(1, \'{"automatically_purge": false, "_type": "EmbeddingsQueueConfigurationInternal"}\')'
)
# The image's /config.yaml; env overrides (port, path, address) apply only in config-file mode.
SERVER_CONFIG = 'persist_path: "/data"\n'


class MeasureError(Exception):
    """The measurement cannot run or went wrong; the message says why."""


@dataclass
class Measurement:
    """One run's figures; byte counts are above the empty server's baseline unless named baseline."""

    chroma_version: str
    dimensions: int
    embeddings: int
    batch: int
    write_log_kept: bool
    baseline_rss_bytes: int
    baseline_disk_bytes: int
    ingest_rss_bytes: int
    ingest_peak_rss_bytes: int
    steady_rss_bytes: int
    disk_bytes: int
    raw_vector_bytes: int
    ingest_bytes_per_embedding: float
    ingest_peak_bytes_per_embedding: float
    steady_bytes_per_embedding: float
    disk_bytes_per_embedding: float
    disk_factor: float
    load_seconds: float
    total_seconds: float
    machine: str


def pinned_version() -> str:
    """The default of chromaVersion in Pulumi.yaml: the server version the VM runs."""
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text(encoding="utf-8"))
    return str(project["config"]["chromaVersion"]["default"])


def installed_version() -> str:
    """The chromadb wheel in this environment, whose `chroma run` is the server measured."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chromadb")
    except PackageNotFoundError as error:
        raise MeasureError("chromadb is not installed here. Fix: scripts/test.sh creates .venv with it.") from error


def machine_description() -> str:
    """CPU model, core count and memory, for the record."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB, {platform.system()} {platform.release()}"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _process_tree(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                pending.extend(int(child) for child in (task / "children").read_text().split())
    return pids


def _status_kib(pid: int, field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes(pid: int) -> int:
    """Resident memory of the server and any processes it started."""
    return sum(_status_kib(each, "VmRSS") for each in _process_tree(pid)) * 1024


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of resident memory since the server started."""
    return sum(_status_kib(each, "VmHWM") for each in _process_tree(pid)) * 1024


def disk_bytes(path: Path) -> int:
    """Bytes the files under `path` occupy on disk (allocated blocks, as du counts them)."""
    total = 0
    for file in path.rglob("*"):
        with contextlib.suppress(OSError):
            stat = file.lstat()
            total += stat.st_blocks * 512
    return total


class Server:
    """`chroma run` in config-file mode, as the image runs it, on loopback with its own data directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.config = workdir / "config.yaml"
        self.config.write_text(SERVER_CONFIG, encoding="utf-8")
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.process is not None  # noqa: S101 - only called while running
        return self.process.pid

    def start(self) -> None:
        """Starts `chroma run` and waits until its heartbeat answers."""
        chroma = Path(sys.executable).with_name("chroma")
        if not chroma.exists():
            raise MeasureError(f"{chroma} not found. Fix: run this with the .venv python that has chromadb.")
        env = {key: value for key, value in os.environ.items() if not key.startswith(("CHROMA_", "OTEL_"))}
        env |= {
            "CHROMA_PERSIST_PATH": str(self.data),
            "CHROMA_PORT": str(self.port),
            "CHROMA_LISTEN_ADDRESS": LOOPBACK,
            "ANONYMIZED_TELEMETRY": "False",
        }
        with (self.workdir / "chroma.log").open("a") as log:
            self.process = subprocess.Popen(  # noqa: S603 - the wheel's own entry point
                [str(chroma), "run", str(self.config)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        url = f"http://{LOOPBACK}:{self.port}{HEARTBEAT_PATH}"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise MeasureError(f"chroma run exited with {self.process.returncode}; see {self.workdir}/chroma.log")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(url, timeout=5) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.2)
        raise MeasureError(f"chroma run did not answer within {START_TIMEOUT_SECONDS:.0f}s")

    def stop(self) -> None:
        """A clean SIGTERM, so the index is on disk before the restart."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise MeasureError("chroma run did not stop on SIGTERM") from None

    def client(self):
        """Chroma's HTTP client for this server."""
        import chromadb

        return chromadb.HttpClient(host=LOOPBACK, port=self.port)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Starts the server and stops it on the way out, whatever happens."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Progress:
    """A one-line progress bar on stderr: done/total, rate and time left."""

    def __init__(self, total: int, label: str, width: int = 30) -> None:
        self.total, self.label, self.width = total, label, width
        self.started = time.monotonic()
        self.interactive = sys.stderr.isatty()
        self.last_line = 0.0

    def update(self, done: int) -> None:
        """Redraws the bar (on a terminal) or prints a line every few seconds (elsewhere)."""
        now = time.monotonic()
        finished = done >= self.total
        # On a pipe or file, a line every 5 s (and the last) instead of one redrawn line.
        if not self.interactive and not finished and now - self.last_line < 5:
            return
        self.last_line = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate else 0.0
        filled = int(self.width * done / self.total) if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {done:,}/{self.total:,}  {rate:,.0f}/s  {left:4.0f}s left"
        end = "\n" if finished or not self.interactive else ""
        print(("\r" if self.interactive else "") + line, end=end, file=sys.stderr, flush=True)


def say(message: str) -> None:
    """A progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def load(collection, dimensions: int, embeddings: int, batch: int) -> None:
    """Adds `embeddings` random float32 vectors in batches, showing progress."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    progress = Progress(embeddings, f"loading {dimensions}-d")
    for start in range(0, embeddings, batch):
        count = min(batch, embeddings - start)
        vectors = rng.random((count, dimensions), dtype=np.float32)
        collection.add(ids=[str(start + offset) for offset in range(count)], embeddings=vectors)
        progress.update(start + count)


def query(collection, dimensions: int) -> None:
    """Nearest-neighbour queries, which make the server load the whole index into memory."""
    import numpy as np

    rng = np.random.default_rng(SEED + 1)
    for _ in range(QUERY_COUNT):
        collection.query(query_embeddings=rng.random((1, dimensions), dtype=np.float32), n_results=10)


def keep_write_log(data: Path) -> None:
    """Turns off the write log's purge in the server's SQLite database."""
    with contextlib.closing(sqlite3.connect(data / "chroma.sqlite3", timeout=30)) as database, database:
        database.execute(KEEP_WRITE_LOG_SQL)


def measure(dimensions: int, embeddings: int, batch: int, workdir: Path, keep_log: bool = False) -> Measurement:
    """Runs the whole measurement in `workdir` (which must be empty or absent)."""
    version = installed_version()
    if version != pinned_version():
        raise MeasureError(
            f"chromadb {version} is installed, but Pulumi.yaml pins chromaVersion {pinned_version()}. "
            "Fix: install requirements.txt (scripts/test.sh does), so the measured server is the one the VM runs."
        )
    began = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    server = Server(workdir)
    name = "measure"
    say(f"chroma run {version} on {LOOPBACK}:{server.port}, data in {server.data}")
    with running(server):
        client = server.client()
        client.heartbeat()
        time.sleep(1.0)  # let the fresh server finish its start-up allocations
        baseline_rss = rss_bytes(server.pid)
        if keep_log:
            keep_write_log(server.data)
        baseline_disk = disk_bytes(server.data)
        say(f"empty server: RSS {baseline_rss / 1e6:,.0f} MB, disk {baseline_disk / 1e6:,.1f} MB")
        batch = min(batch, client.get_max_batch_size(), max(1, MAX_FLOATS_PER_BATCH // dimensions))
        collection = client.create_collection(name)
        load_began = time.monotonic()
        load(collection, dimensions, embeddings, batch)
        load_seconds = time.monotonic() - load_began
        if collection.count() != embeddings:
            raise MeasureError(f"the collection holds {collection.count():,} embeddings, not {embeddings:,}")
        ingest_rss = rss_bytes(server.pid)
        ingest_peak = peak_rss_bytes(server.pid)
        say(f"after loading: RSS {ingest_rss / 1e6:,.0f} MB, peak {ingest_peak / 1e6:,.0f} MB")
    say("restarting, then querying")
    with running(server):
        collection = server.client().get_collection(name)
        query(collection, dimensions)
        time.sleep(1.0)
        steady_rss = rss_bytes(server.pid)
        say(f"after restart and {QUERY_COUNT} queries: RSS {steady_rss / 1e6:,.0f} MB")
    on_disk = disk_bytes(server.data)
    raw = embeddings * dimensions * 4

    def above(value: int, baseline: int) -> int:
        return max(0, value - baseline)

    return Measurement(
        chroma_version=version,
        dimensions=dimensions,
        embeddings=embeddings,
        batch=batch,
        write_log_kept=keep_log,
        baseline_rss_bytes=baseline_rss,
        baseline_disk_bytes=baseline_disk,
        ingest_rss_bytes=above(ingest_rss, baseline_rss),
        ingest_peak_rss_bytes=above(ingest_peak, baseline_rss),
        steady_rss_bytes=above(steady_rss, baseline_rss),
        disk_bytes=above(on_disk, baseline_disk),
        raw_vector_bytes=raw,
        ingest_bytes_per_embedding=round(above(ingest_rss, baseline_rss) / embeddings, 1),
        ingest_peak_bytes_per_embedding=round(above(ingest_peak, baseline_rss) / embeddings, 1),
        steady_bytes_per_embedding=round(above(steady_rss, baseline_rss) / embeddings, 1),
        disk_bytes_per_embedding=round(above(on_disk, baseline_disk) / embeddings, 1),
        disk_factor=round(above(on_disk, baseline_disk) / raw, 3),
        load_seconds=round(load_seconds, 1),
        total_seconds=round(time.monotonic() - began, 1),
        machine=machine_description(),
    )


def report(result: Measurement) -> str:
    """The human-readable result table."""
    n = result.embeddings
    rows = [
        ("after loading", result.ingest_rss_bytes, result.ingest_bytes_per_embedding),
        ("peak while loading", result.ingest_peak_rss_bytes, result.ingest_peak_bytes_per_embedding),
        ("after restart + queries", result.steady_rss_bytes, result.steady_bytes_per_embedding),
        ("on disk", result.disk_bytes, result.disk_bytes_per_embedding),
    ]
    lines = [
        f"Chroma {result.chroma_version}: {n:,} embeddings of {result.dimensions} dimensions "
        f"({result.raw_vector_bytes / 1e6:,.0f} MB of raw float32), loaded in {result.load_seconds:.0f}s",
        f"empty server baseline: RSS {result.baseline_rss_bytes / 1e6:,.0f} MB, "
        f"disk {result.baseline_disk_bytes / 1e6:,.1f} MB",
        f"{'above the baseline':<25} {'total':>12} {'per embedding':>15}",
    ]
    lines += [f"{label:<25} {total / 1e6:>9,.0f} MB {per:>13,.0f} B" for label, total, per in rows]
    lines.append(f"disk / raw vectors: {result.disk_factor:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dimensions", type=int, required=True, help="dimensions of each embedding")
    parser.add_argument("--embeddings", type=int, required=True, help="how many embeddings to load")
    parser.add_argument("--batch", type=int, default=5000, help="embeddings per add() call (default 5000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--keep-write-log", action="store_true", help="keep Chroma's write log (no purge)")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.dimensions < 1 or args.embeddings < 1 or args.batch < 1:
        parser.error("--dimensions, --embeddings and --batch must be positive")
    try:
        if args.keep:
            result = measure(args.dimensions, args.embeddings, args.batch, args.keep, args.keep_write_log)
        else:
            workdir = Path(tempfile.mkdtemp(prefix="chroma-measure-"))
            try:
                result = measure(args.dimensions, args.embeddings, args.batch, workdir, args.keep_write_log)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    except MeasureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(result), "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}))
    else:
        print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
