"""Real `chroma run` servers to crash, a writer that remembers every acknowledged write, and the checks.

A `Ledger` holds what Chroma acknowledged (adds and updates with their exact float32 vectors,
deletes) and what was in flight when the server died (either outcome is allowed for those).
`check_server` then compares a server's answers with the ledger: every acknowledged record is
there with its exact embedding, deleted ones are absent, and queries by a sample's own vectors
find them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.live import IMAGE_CONFIG, LOOPBACK, free_port, http_status

ROOT = Path(__file__).resolve().parent.parent.parent
DIMENSIONS = 32
# Chroma persists an index every sync_threshold records (1,000 by default); a lower one rewrites
# the unsynced index files more often, so small collections cross many persists.
HNSW_CONFIGURATION = {"hnsw": {"sync_threshold": 60, "batch_size": 30}}
BATCH = 20
COLLECTION_NAMES = ["crash-alpha", "crash-beta"]
BASE = "/api/v2/tenants/default_tenant/databases/default_database"
# The server `chroma run` starts, without the seconds the `chroma` script spends importing the
# Python client first (it then hands its arguments to these same bindings). Many starts add up.
CHROMA_RUN = [
    sys.executable,
    "-c",
    "import sys, chromadb_rust_bindings; chromadb_rust_bindings.cli(['chroma', *sys.argv[1:]])",
]


def load_chroma_data():
    """scripts/chroma_data.py as a module: the project's own tool, as the VM runs it."""
    spec = importlib.util.spec_from_file_location("chroma_data", ROOT / "scripts" / "chroma_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chroma_data"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


chroma_data = load_chroma_data()


def float32_vector(rng: random.Random) -> list[float]:
    """A vector whose values survive float32 storage exactly, so comparisons can be exact."""
    return [struct.unpack("<f", struct.pack("<f", rng.uniform(-1, 1)))[0] for _ in range(DIMENSIONS)]


def same_float32(got: list[float] | None, expected: list[float]) -> bool:
    """Whether an embedding came back exactly as written, compared as the float32 values Chroma stores."""
    if got is None or len(got) != len(expected):
        return False
    layout = f"<{len(expected)}f"
    return struct.pack(layout, *got) == struct.pack(layout, *expected)


@dataclass
class Server:
    """A `chroma run` process on loopback over a data directory."""

    data_dir: Path
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def endpoint(self):
        return chroma_data.Endpoint(self.url, {}, None)

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM, as Docker and systemd stop it; returns the exit code."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise


def start_server(data_dir: Path, workdir: Path, timeout: float = 60) -> Server:
    """`chroma run` in config-file mode, as the image runs it; returns once the heartbeat answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yaml"
    config.write_text(IMAGE_CONFIG, encoding="utf-8")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CHROMA_", "OTEL_"))}
    env |= {
        "CHROMA_PERSIST_PATH": str(data_dir),
        "CHROMA_PORT": str(port),
        "CHROMA_LISTEN_ADDRESS": LOOPBACK,
        "ANONYMIZED_TELEMETRY": "False",
    }
    with (workdir / "chroma.log").open("a") as log:
        process = subprocess.Popen(
            [*CHROMA_RUN, "run", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(data_dir, port, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chroma run exited with {process.returncode}; see {workdir / 'chroma.log'}")
        with contextlib.suppress(OSError):
            if http_status(server.url + "/api/v2/heartbeat") == 200:
                return server
        time.sleep(0.05)
    server.kill9()
    raise RuntimeError(f"chroma run did not answer within {timeout:.0f}s")


@contextlib.contextmanager
def running(data_dir: Path, workdir: Path) -> Iterator[Server]:
    """A server that is killed (not stopped cleanly) when the block ends, whatever happens."""
    server = start_server(data_dir, workdir)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.kill9()


# ---------------------------------------------------------------------------------------------
# What Chroma acknowledged


@dataclass
class Ledger:
    """Acknowledged state per collection name: id -> vector (None: deleted); plus ids in flight."""

    records: dict[str, dict[str, list[float] | None]] = field(default_factory=dict)
    in_flight: dict[str, set[str]] = field(default_factory=dict)
    acknowledged_writes: int = 0

    def copy(self) -> Ledger:
        return Ledger(
            {name: dict(records) for name, records in self.records.items()},
            {name: set(ids) for name, ids in self.in_flight.items()},
            self.acknowledged_writes,
        )


class Writer:
    """Adds, updates and deletes in batches against one server until stopped; records each ack."""

    def __init__(self, server: Server, ledger: Ledger, collections: list[str], seed: int) -> None:
        self.server = server
        self.ledger = ledger
        self.collections = collections
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.next_id = sum(len(records) for records in ledger.records.values())

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=60)

    def snapshot(self) -> Ledger:
        """The ledger as of now (an in-flight batch stays in flight)."""
        with self.lock:
            return self.ledger.copy()

    def _collection_ids(self) -> dict[str, str]:
        ids = {}
        for name in self.collections:
            created = self.server.endpoint.call(
                "POST",
                f"{BASE}/collections",
                {"name": name, "configuration": HNSW_CONFIGURATION, "get_or_create": True},
            )
            ids[name] = created["id"]
            self.ledger.records.setdefault(name, {})
            self.ledger.in_flight.setdefault(name, set())
        return ids

    def _batch(self, name: str) -> tuple[str, dict[str, Any], dict[str, list[float] | None]]:
        live = [key for key, vector in self.ledger.records[name].items() if vector is not None]
        kind = self.rng.choices(("add", "update", "delete"), weights=(6, 2, 1))[0] if len(live) > BATCH else "add"
        if kind == "add":
            ids = [f"r{self.next_id + offset}" for offset in range(BATCH)]
            self.next_id += BATCH
        else:
            ids = self.rng.sample(live, BATCH // 2)
        if kind == "delete":
            return "delete", {"ids": ids}, dict.fromkeys(ids)
        vectors = [float32_vector(self.rng) for _ in ids]
        return kind, {"ids": ids, "embeddings": vectors}, dict(zip(ids, vectors, strict=True))

    def _run(self) -> None:
        try:
            collection_ids = self._collection_ids()
        except (urllib.error.URLError, OSError):
            return
        while not self.stopped.is_set():
            name = self.rng.choice(self.collections)
            with self.lock:
                kind, body, effect = self._batch(name)
                self.ledger.in_flight[name].update(effect)
            try:
                self.server.endpoint.call("POST", f"{BASE}/collections/{collection_ids[name]}/{kind}", body)
            except (urllib.error.URLError, OSError, ValueError):
                return  # the server died: these ids stay in flight
            with self.lock:
                self.ledger.records[name].update(effect)
                self.ledger.in_flight[name].difference_update(effect)
                self.ledger.acknowledged_writes += 1


# ---------------------------------------------------------------------------------------------
# Checking a server against the ledger


def _all_records(server: Server, collection_id: str) -> dict[str, list[float]]:
    records, offset = {}, 0
    while True:
        page = server.endpoint.call(
            "POST",
            f"{BASE}/collections/{collection_id}/get",
            {"limit": 500, "offset": offset, "include": ["embeddings"]},
        )
        records.update(zip(page["ids"], page["embeddings"], strict=True))
        if len(page["ids"]) < 500:
            return records
        offset += 500


def check_server(server: Server, ledger: Ledger, query_sample: int = 10, seed: int = 0) -> list[str]:
    """What the server lost or got wrong, against the ledger; empty means whole."""
    problems = []
    try:
        listed = {item["name"]: item["id"] for item in server.endpoint.call("GET", f"{BASE}/collections")}
    except (urllib.error.URLError, OSError, ValueError) as error:
        return [f"list collections: {chroma_data._error_text(error)}"]
    rng = random.Random(seed)
    for name, expected in ledger.records.items():
        if not expected and name not in listed:
            continue
        if name not in listed:
            problems.append(f"{name}: collection missing")
            continue
        try:
            got = _all_records(server, listed[name])
            present = {key: vector for key, vector in expected.items() if vector is not None}
            missing = [key for key in present if key not in got and key not in ledger.in_flight[name]]
            wrong = [
                key
                for key, vector in present.items()
                if key in got and not same_float32(got[key], vector) and key not in ledger.in_flight[name]
            ]
            resurrected = [key for key, vector in expected.items() if vector is None and key in got]
            resurrected = [key for key in resurrected if key not in ledger.in_flight[name]]
            unknown = [key for key in got if key not in expected and key not in ledger.in_flight[name]]
            for label, keys in (
                ("acknowledged records missing", missing),
                ("records with a wrong embedding", wrong),
                ("deleted records back", resurrected),
                ("records never written", unknown),
            ):
                if keys:
                    problems.append(f"{name}: {len(keys)} {label} (e.g. {keys[0]})")
            settled = [key for key in present if key in got and key not in ledger.in_flight[name]]
            sample = rng.sample(settled, min(query_sample, len(settled)))
            if sample:
                found = server.endpoint.call(
                    "POST",
                    f"{BASE}/collections/{listed[name]}/query",
                    {"query_embeddings": [present[key] for key in sample], "n_results": 3, "include": []},
                )
                misses = [key for key, hits in zip(sample, found["ids"], strict=True) if key not in hits]
                if misses:
                    problems.append(f"{name}: queries by their own vectors missed {len(misses)} of {len(sample)}")
        except (urllib.error.URLError, OSError, ValueError, KeyError) as error:
            problems.append(f"{name}: {chroma_data._error_text(error)}")
    return problems


def settle(server: Server, ledger: Ledger) -> Ledger:
    """The ledger with each in-flight write resolved to what the server now holds."""
    settled = ledger.copy()
    listed = {item["name"]: item["id"] for item in server.endpoint.call("GET", f"{BASE}/collections")}
    for name, keys in settled.in_flight.items():
        if keys and name in listed:
            got = _all_records(server, listed[name])
            settled.records[name].update({key: got.get(key) for key in keys})
        keys.clear()
    return settled


def copy_data(source: Path, target: Path) -> None:
    """A copy of a data directory that keeps sparse files sparse (a broken index can be huge)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--sparse=always", str(source), str(target)], check=True)


def remove(path: Path) -> None:
    """Removes a directory tree made by the test."""
    shutil.rmtree(path, ignore_errors=True)
