#!/usr/bin/env python3
"""Crash safety for a single-node Chroma 1.x data directory: keep the write log, verify, repair.

Chroma fsyncs its SQLite file but never its vector index (HNSW) files, and by default it purges
its write log (`embeddings_queue`) once the index says it has persisted. A kill -9, an OOM kill,
a host crash or a crash-consistent disk snapshot can then leave an index that is truncated, or
older or newer than SQLite's record, and the vectors exist nowhere else. With the log kept, a
vector index moved aside is rebuilt completely from the log on the collection's first read.

    chroma_data.py keep-log DATA_DIR           keep the log from now on (server running or not)
    chroma_data.py verify --endpoint URL       every collection counts, gets and finds its records
    chroma_data.py repair DATA_DIR [--all]     move broken (or all) vector indexes aside (server stopped)

Every start of Chroma's container (cloud-init/chroma-start.sh, its entrypoint on both targets) is
answered by `guard`, which runs `before-start` and `after-start` around it. Standard library only: it runs
on the VM host. Exit codes: 0 ok, 1 broken collections or a refused repair, 2 usage,
3 (after-start) broken collections that a repair can fix. The token is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import ssl
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_BROKEN, EXIT_USAGE, EXIT_REPAIRABLE = 0, 1, 2, 3
DATABASE_FILE = "chroma.sqlite3"
# Written only after Chroma exited cleanly; removed (durably) before Chroma starts.
CLEAN_MARKER = ".clean-shutdown"
# Left by before-start when it moved indexes aside: after-start then times the rebuild.
REBUILD_PENDING = ".rebuild-pending"
# The handshake with chroma-start.sh (the Chroma container's entrypoint): it asks, the guard checks
# the data and approves, Chroma starts, the guard keeps the log and rebuilds, then marks it ready
# (Chroma's health check wants that file, and the proxy waits for that health).
START_REQUEST, START_APPROVED, READY = ".start-requested", ".start-approved", ".ready"
GUARD_POLL_SECONDS = 0.5
HEARTBEAT_TIMEOUT_SECONDS = 300
# Moved-aside indexes go here, inside the data directory: the same filesystem, so a move is a
# rename that copies nothing (a broken link_lists.bin can be sparse and terabytes long).
MOVED_ASIDE_DIR = "moved-aside"
KEEP_LOG_CONFIG = '{"automatically_purge": false, "_type": "EmbeddingsQueueConfigurationInternal"}'
HNSW_FILES = ("header.bin", "data_level0.bin", "length.bin", "link_lists.bin", "index_metadata.pickle")
# hnswlib's header.bin as Chroma 1.5 writes it: a version, then the index's shape (packed, little-endian).
HNSW_HEADER = struct.Struct("<iQQQQQQiIQQQdQ")
SQLITE_TIMEOUT_SECONDS = 30
REQUEST_TIMEOUT_SECONDS = 30
# A rebuild takes about 0.4-1.5 ms per 384-d record on 2 cores: an hour covers millions.
REBUILD_TIMEOUT_SECONDS = 3600
DEFAULT_SAMPLE = 20
DEFAULT_TENANT = "default_tenant"
AUTHORIZATION, X_CHROMA_TOKEN = "Authorization", "X-Chroma-Token"
PAGE = 100


class UsageError(Exception):
    """Bad arguments or a data directory that is not Chroma's: exit 2."""


class RefusedError(Exception):
    """An operation that would lose data, refused with the reason: exit 1."""


def log(message: str) -> None:
    """One progress line on stdout (the journal, on the VM), flushed at once."""
    print(f"chroma-data: {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# SQLite: the log flag and the segment records


def _database(data_dir: Path) -> Path:
    database = data_dir / DATABASE_FILE
    if not database.is_file():
        raise UsageError(f"{database}: no Chroma database here (is {data_dir} Chroma's persist_path?)")
    return database


def _connect(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(_database(data_dir), timeout=SQLITE_TIMEOUT_SECONDS, isolation_level=None)


def log_kept(data_dir: Path) -> bool:
    """Whether Chroma keeps its write log (automatically_purge is false)."""
    with _connect(data_dir) as db:
        row = db.execute("SELECT config_json_str FROM embeddings_queue_config WHERE id = 1").fetchone()
    # No row means Chroma's default, which purges.
    return row is not None and json.loads(row[0]).get("automatically_purge") is False


def keep_log(data_dir: Path) -> bool:
    """Sets the flag (idempotent); True if it changed. Chroma re-reads the row at every purge."""
    if log_kept(data_dir):
        return False
    with _connect(data_dir) as db:
        db.execute(
            "INSERT OR REPLACE INTO embeddings_queue_config (id, config_json_str) VALUES (1, ?)", (KEEP_LOG_CONFIG,)
        )
    if not log_kept(data_dir):
        raise RefusedError(f"{data_dir / DATABASE_FILE}: the keep-log flag did not stick")
    return True


@dataclass(frozen=True)
class VectorSegment:
    """One collection's vector index: a folder beside chroma.sqlite3, named by its segment id."""

    segment_id: str
    collection_id: str
    collection_name: str
    metadata_segment_id: str | None
    persisted_seq_id: int | None  # what SQLite records the index has persisted (max_seq_id)


def vector_segments(data_dir: Path) -> list[VectorSegment]:
    """Every collection's vector segment, from SQLite."""
    with _connect(data_dir) as db:
        rows = db.execute(
            """
            SELECT s.id, s.collection, c.name,
                   (SELECT m.id FROM segments m WHERE m.collection = s.collection AND m.scope = 'METADATA'),
                   (SELECT CAST(q.seq_id AS INTEGER) FROM max_seq_id q WHERE q.segment_id = s.id)
            FROM segments s JOIN collections c ON c.id = s.collection
            WHERE s.scope = 'VECTOR' ORDER BY c.name
            """
        ).fetchall()
    return [VectorSegment(*row) for row in rows]


# ---------------------------------------------------------------------------------------------
# Reading an index without trusting it


def _read_pickle_maps(path: Path) -> dict[str, Any]:
    """The top-level dict of Chroma's index_metadata.pickle, read opcode by opcode (nothing executes)."""
    import pickletools  # only repair needs it

    stack: list[Any] = []
    marks: list[int] = []
    for opcode, argument, _ in pickletools.genops(path.read_bytes()):
        name = opcode.name
        if name in ("PROTO", "FRAME", "MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            continue
        if name == "STOP":
            break
        if name in ("EMPTY_DICT", "EMPTY_LIST"):
            stack.append({} if name == "EMPTY_DICT" else [])
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("SETITEMS", "APPENDS"):
            start = marks.pop()
            items, target = stack[start:], stack[start - 1]
            del stack[start:]
            if name == "SETITEMS":
                target.update(zip(items[::2], items[1::2], strict=True))
            else:
                target.extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "NONE":
            stack.append(None)
        elif name in ("NEWTRUE", "NEWFALSE"):
            stack.append(name == "NEWTRUE")
        elif name in (
            "BININT",
            "BININT1",
            "BININT2",
            "LONG1",
            "LONG4",
            "BINUNICODE",
            "SHORT_BINUNICODE",
            "BINUNICODE8",
            "BINFLOAT",
        ):
            stack.append(argument)
        else:
            raise ValueError(f"unexpected pickle opcode {name}")
    if len(stack) != 1 or not isinstance(stack[0], dict):
        raise ValueError("not a dict")
    return stack[0]


def index_problem(data_dir: Path, segment: VectorSegment) -> str | None:
    """Why this vector index cannot be trusted, or None when it is consistent with SQLite."""
    folder = data_dir / segment.segment_id
    if not folder.exists():
        return None  # nothing persisted yet, or already moved: Chroma builds it from the log
    missing = [name for name in HNSW_FILES if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    header_bytes = (folder / "header.bin").read_bytes()
    if len(header_bytes) != HNSW_HEADER.size:
        return f"header.bin is {len(header_bytes)} bytes, not {HNSW_HEADER.size}"
    _, _, max_elements, count, bytes_per_element, *_ = HNSW_HEADER.unpack(header_bytes)
    if count > max_elements:
        return f"header.bin says {count} elements in room for {max_elements}"
    level0 = (folder / "data_level0.bin").stat().st_size
    if level0 != count * bytes_per_element:
        return f"data_level0.bin is {level0} bytes, the header needs {count * bytes_per_element}"
    if (folder / "length.bin").stat().st_size != count * 4:
        return f"length.bin does not match the header's {count} elements"
    try:
        maps = _read_pickle_maps(folder / "index_metadata.pickle")
        labels = maps["id_to_label"]
        added = int(maps["total_elements_added"])
    except (ValueError, KeyError, IndexError, TypeError) as error:
        return f"index_metadata.pickle unreadable ({error})"
    if added != count:
        return f"index_metadata.pickle has {added} elements, header.bin {count}: written at different times"
    if segment.metadata_segment_id is None or segment.persisted_seq_id is None:
        return None
    persisted = segment.persisted_seq_id
    with _connect(data_dir) as db:
        recorded = dict(
            db.execute(
                "SELECT embedding_id, CAST(seq_id AS INTEGER) FROM embeddings WHERE segment_id = ?",
                (segment.metadata_segment_id,),
            )
        )
        first_logged_after = {
            row[0]
            for row in db.execute(
                "SELECT id FROM embeddings_queue WHERE topic LIKE ? GROUP BY id HAVING MIN(seq_id) > ?",
                (f"%/{segment.collection_id}", persisted),
            )
        }
    # Behind: a record SQLite says the index holds is not in it (the case that fails silently).
    behind = sum(1 for key, seq in recorded.items() if seq <= persisted and key not in labels)
    if behind:
        return f"behind SQLite's record: {behind} records up to seq {persisted} are missing"
    # Ahead: the index holds records first written after the seq SQLite says it persisted.
    ahead = sum(1 for key in labels if key in first_logged_after)
    if ahead:
        return f"ahead of SQLite's record: {ahead} records first written after seq {persisted}"
    return None


def log_gaps(data_dir: Path, segment: VectorSegment) -> int:
    """How many of the collection's records have their latest write purged from the log (0: rebuildable)."""
    if segment.metadata_segment_id is None:
        return 0
    with _connect(data_dir) as db:
        row = db.execute(
            "SELECT COUNT(*) FROM embeddings WHERE segment_id = ? AND CAST(seq_id AS INTEGER) NOT IN "
            "(SELECT seq_id FROM embeddings_queue)",
            (segment.metadata_segment_id,),
        ).fetchone()
    return int(row[0])


# ---------------------------------------------------------------------------------------------
# repair


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(data_dir: Path, move_all: bool) -> list[tuple[VectorSegment, str]]:
    """Moves broken (or all) vector indexes aside, never deleting; returns what moved and why."""
    if not log_kept(data_dir):
        raise RefusedError(
            f"{data_dir}: Chroma purges its write log here, so a moved index could not be rebuilt and its "
            f"vectors would be lost. Run `chroma_data.py keep-log {data_dir}` first; it protects writes from then on."
        )
    chosen = []
    for segment in vector_segments(data_dir):
        if not (data_dir / segment.segment_id).exists():
            continue
        reason = "--all" if move_all else index_problem(data_dir, segment)
        if not reason:
            continue
        gaps = log_gaps(data_dir, segment)
        if gaps:
            # Purged before the log was kept: this index is the only copy of those vectors.
            log(f"repair: NOT moving {segment.collection_name} ({reason}): {gaps} records are no longer in the log")
            continue
        chosen.append((segment, reason))
    if not chosen:
        return []
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = data_dir / MOVED_ASIDE_DIR / stamp
    aside.mkdir(parents=True)
    for segment, _ in chosen:
        # A rename on one filesystem: nothing is copied, sparse files stay as they are.
        os.rename(data_dir / segment.segment_id, aside / segment.segment_id)
    for folder in (aside, aside.parent, data_dir):  # the renames survive a crash right after
        _fsync_dir(folder)
    return [(segment, f"{reason} -> {aside / segment.segment_id}") for segment, reason in chosen]


# ---------------------------------------------------------------------------------------------
# verify: Chroma's HTTP API, through the proxy (with the token) or straight to the server


@dataclass(frozen=True)
class Endpoint:
    """Where Chroma answers, and how to authenticate there."""

    url: str
    headers: dict[str, str]
    context: ssl.SSLContext | None

    def call(self, method: str, path: str, body: Any = None, timeout: float = REQUEST_TIMEOUT_SECONDS) -> Any:
        """One JSON request, with a timeout; HTTP errors raise urllib.error.HTTPError."""
        data = None if body is None else json.dumps(body).encode()
        headers = {**self.headers, "Content-Type": "application/json"}
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)  # noqa: S310 - http(s) checked
        with urllib.request.urlopen(request, timeout=timeout, context=self.context) as response:  # noqa: S310
            return json.loads(response.read() or b"null")


def _paged(endpoint: Endpoint, path: str) -> Iterator[dict[str, Any]]:
    offset = 0
    while True:
        page = endpoint.call("GET", f"{path}?limit={PAGE}&offset={offset}")
        yield from page
        if len(page) < PAGE:
            return
        offset += PAGE


def _error_text(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        body = error.read(300).decode(errors="replace").strip()
        return f"HTTP {error.code} {body}"
    return f"{type(error).__name__}: {error}"


def check_collection(endpoint: Endpoint, base: str, collection: dict[str, Any], sample: int) -> str | None:
    """Why this collection is broken (count, get with embeddings, query by own vectors), or None."""
    path = f"{base}/collections/{collection['id']}"
    try:
        count = int(endpoint.call("GET", f"{path}/count"))
        if count == 0:
            return None
        # Records spread over the whole collection: an old index misses old and new ones alike.
        offsets = sorted({random.randrange(count) for _ in range(sample)})  # noqa: S311 - sampling, not secrets
        ids, vectors = [], []
        for offset in offsets:
            got = endpoint.call("POST", f"{path}/get", {"limit": 1, "offset": offset, "include": ["embeddings"]})
            if not got["ids"]:
                return f"get at offset {offset} of {count} returned nothing"
            if not got.get("embeddings") or got["embeddings"][0] is None:
                return f"record {got['ids'][0]!r} came back without its embedding"
            ids.append(got["ids"][0])
            vectors.append(got["embeddings"][0])
        found = endpoint.call(
            "POST", f"{path}/query", {"query_embeddings": vectors, "n_results": min(10, count), "include": []}
        )
        missed = [record for record, hits in zip(ids, found["ids"], strict=True) if record not in hits]
        if missed:
            return f"a query by their own vectors missed {len(missed)} of {len(ids)} sampled records"
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as error:
        return _error_text(error)
    return None


def collections(endpoint: Endpoint) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(database name, its API path, collection) for every collection of the default tenant."""
    tenant = f"/api/v2/tenants/{DEFAULT_TENANT}"
    for database in _paged(endpoint, f"{tenant}/databases"):
        base = f"{tenant}/databases/{urllib.parse.quote(database['name'], safe='')}"
        for collection in _paged(endpoint, f"{base}/collections"):
            yield database["name"], base, collection


def verify(endpoint: Endpoint, sample: int) -> tuple[int, list[str]]:
    """(collections checked, one line per broken collection) across every database of the tenant."""
    checked, broken = 0, []
    for database, base, collection in collections(endpoint):
        checked += 1
        problem = check_collection(endpoint, base, collection, sample)
        if problem:
            broken.append(f"{database}/{collection['name']} ({collection['id']}): {problem}")
    return checked, broken


def rebuild(endpoint: Endpoint) -> tuple[int, float]:
    """Reads each collection once, which makes Chroma rebuild a moved index from the log; (count, seconds)."""
    started, rebuilt = time.monotonic(), 0
    for database, base, collection in collections(endpoint):
        one = time.monotonic()
        try:
            # The first read of a moved index waits for the whole rebuild: minutes for millions of records.
            endpoint.call(
                "POST",
                f"{base}/collections/{collection['id']}/get",
                {"limit": 1, "include": ["embeddings"]},
                timeout=REBUILD_TIMEOUT_SECONDS,
            )
            rebuilt += 1
            log(f"after-start: rebuilt {database}/{collection['name']} in {time.monotonic() - one:.1f}s")
        except (urllib.error.URLError, OSError, ValueError) as error:
            log(f"after-start: rebuilding {database}/{collection['name']} failed: {_error_text(error)}")
    return rebuilt, time.monotonic() - started


def build_endpoint(args: argparse.Namespace, environ: dict[str, str]) -> Endpoint:
    """The endpoint from --endpoint/--token/--auth-header/--ca-cert, falling back to CHROMA_* variables."""
    url = (args.endpoint or environ.get("CHROMA_ENDPOINT", "")).rstrip("/")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"the endpoint must look like https://host[:port], not {url!r}")
    token = args.token or environ.get("CHROMA_TOKEN", "")
    auth_header = args.auth_header or environ.get("CHROMA_AUTH_HEADER") or AUTHORIZATION
    if auth_header not in (AUTHORIZATION, X_CHROMA_TOKEN):
        raise UsageError(f"the auth header must be {AUTHORIZATION} or {X_CHROMA_TOKEN}, not {auth_header!r}")
    headers = {}
    if token:
        headers[auth_header] = f"Bearer {token}" if auth_header == AUTHORIZATION else token
    context = None
    if parsed.scheme == "https":
        if args.ca_cert and not Path(args.ca_cert).is_file():
            raise UsageError(f"--ca-cert {args.ca_cert}: no such file")
        context = ssl.create_default_context(cafile=args.ca_cert or None)
    return Endpoint(url, headers, context)


def run_verify(endpoint: Endpoint, sample: int) -> int:
    """Prints the result of verify; EXIT_BROKEN names each broken collection."""
    started = time.monotonic()
    checked, broken = verify(endpoint, sample)
    seconds = time.monotonic() - started
    for line in broken:
        log(f"verify: BROKEN {line}")
    log(f"verify: {checked - len(broken)} of {checked} collections whole ({seconds:.1f}s)")
    return EXIT_BROKEN if broken else EXIT_OK


# ---------------------------------------------------------------------------------------------
# The boot sequence: before Chroma starts, after it answers, after it stopped cleanly


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(path.parent)


def before_start(data_dir: Path) -> int:
    """Repairs after an unclean stop, then keeps the log, all before Chroma (and so any client) starts."""
    if not (data_dir / DATABASE_FILE).is_file():
        log("before-start: no database yet; Chroma creates it, and its writes go unprotected until after-start")
        return EXIT_OK
    _repair_if_unclean(data_dir)
    # After the repair decision: a repair must see whether the log was kept, not the flag set just now.
    if keep_log(data_dir):
        log("before-start: write log kept from now on (automatically_purge set to false)")
    return EXIT_OK


def _repair_if_unclean(data_dir: Path) -> None:
    """After an unclean stop, moves every index aside (rebuilt on first read); arms the crash detector."""
    marker = data_dir / CLEAN_MARKER
    if marker.exists():
        log("before-start: last stop was clean; indexes kept")
        marker.unlink()
        _fsync_dir(data_dir)  # a crash from here on must find no marker
        return
    log("before-start: no clean-shutdown marker: Chroma crashed, was killed, or this disk is a restored copy")
    try:
        moved = repair(data_dir, move_all=True)
    except RefusedError as error:
        log(f"before-start: NOT repairing: {error}")
        return
    for segment, detail in moved:
        log(f"before-start: moved aside {segment.collection_name}: {detail}")
    if moved:
        _write_durably(data_dir / REBUILD_PENDING, json.dumps([segment.collection_name for segment, _ in moved]))
    log(f"before-start: {len(moved)} vector indexes will be rebuilt from the write log on first read")


def after_start(data_dir: Path, endpoint: Endpoint, sample: int) -> int:
    """Keeps the log (from the first write), rebuilds what before-start moved by reading it, verifies."""
    if keep_log(data_dir):
        log("after-start: write log kept from now on (automatically_purge set to false)")
    else:
        log("after-start: write log already kept")
    pending = data_dir / REBUILD_PENDING
    if pending.exists():
        rebuilt, seconds = rebuild(endpoint)
        log(f"after-start: rebuilt {rebuilt} collections from the write log in {seconds:.1f}s")
        pending.unlink()
    started = time.monotonic()
    checked, broken = verify(endpoint, sample)
    seconds = time.monotonic() - started
    for line in broken:
        log(f"after-start: BROKEN {line}")
    log(f"after-start: verify: {checked - len(broken)} of {checked} collections whole ({seconds:.1f}s)")
    if not broken:
        return EXIT_OK
    return EXIT_REPAIRABLE if log_kept(data_dir) else EXIT_BROKEN


def wait_for_heartbeat(endpoint: Endpoint, timeout: float, superseded: Path | None = None) -> bool:
    """Whether Chroma answered its heartbeat within `timeout` seconds (False once `superseded` exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            endpoint.call("GET", "/api/v2/heartbeat")
            return True
        except (urllib.error.URLError, OSError, ValueError):
            if superseded is not None and superseded.exists():
                return False
            time.sleep(0.2)
    return False


def guard_once(data_dir: Path, endpoint: Endpoint, sample: int) -> None:
    """Answers one start request of chroma-start.sh: check before Chroma opens, rebuild and verify after."""
    request = (data_dir / START_REQUEST).read_text(encoding="utf-8").strip()
    log(f"guard: start request {request}")
    try:
        before_start(data_dir)
    except (sqlite3.Error, OSError, ValueError) as error:
        log(f"guard: before-start failed ({error}); letting Chroma start to report it")
    _write_durably(data_dir / START_APPROVED, request)
    (data_dir / START_REQUEST).unlink(missing_ok=True)
    # A start that dies before it answers (a bad version or setting) is followed by another: a Docker
    # restart, or chroma-apply's rollback. That one is answered now, not after the full wait.
    if not wait_for_heartbeat(endpoint, HEARTBEAT_TIMEOUT_SECONDS, superseded=data_dir / START_REQUEST):
        if (data_dir / START_REQUEST).exists():
            log(f"guard: start {request} never answered, and a newer start asks; answering that one")
        else:
            log(f"guard: Chroma did not answer within {HEARTBEAT_TIMEOUT_SECONDS}s of its approval")
        return
    try:
        code = after_start(data_dir, endpoint, sample)
    except (sqlite3.Error, OSError, ValueError, urllib.error.URLError) as error:
        log(f"guard: after-start failed ({error})")
        code = EXIT_BROKEN
    if code == EXIT_REPAIRABLE:
        log("guard: broken after a clean stop: restart the chroma container to rebuild (its marker is gone)")
    # Ready even with a broken collection: the others serve, and the broken one is named above.
    (data_dir / READY).write_text(request + "\n", encoding="utf-8")
    log("guard: ready; the proxy may take traffic")


def guard(data_dir: Path, endpoint: Endpoint, sample: int) -> int:
    """Waits for chroma-start.sh's start requests and answers each, for as long as it runs."""
    log(f"guard: watching {data_dir} for Chroma's starts")
    while True:
        if (data_dir / START_REQUEST).exists():
            guard_once(data_dir, endpoint, sample)
        time.sleep(GUARD_POLL_SECONDS)


# ---------------------------------------------------------------------------------------------
# Command line


def _data_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="chroma_data.py",
        description="Keep Chroma's write log, verify every collection, repair broken vector indexes.",
        epilog="Exit codes: 0 ok, 1 broken or refused, 2 usage, 3 broken but repairable (after-start). "
        "Prefer CHROMA_TOKEN to --token: a command line is visible to other users of the machine.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_endpoint(command: argparse.ArgumentParser) -> None:
        command.add_argument("--endpoint", metavar="URL", help="Chroma or its proxy (default: $CHROMA_ENDPOINT)")
        command.add_argument("--token", metavar="TOKEN", help="the token clients send (default: $CHROMA_TOKEN)")
        command.add_argument(
            "--auth-header",
            choices=(AUTHORIZATION, X_CHROMA_TOKEN),
            help=f"header that carries the token (default: $CHROMA_AUTH_HEADER or {AUTHORIZATION})",
        )
        command.add_argument("--ca-cert", metavar="FILE", help="trust this CA (PEM) instead of the system's")
        command.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="records checked per collection")

    command = commands.add_parser("keep-log", help="keep the write log (the server may be running)")
    command.add_argument("data_dir", type=_data_dir, metavar="DATA_DIR")
    command = commands.add_parser("verify", help="check that every collection answers count, get and query")
    with_endpoint(command)
    command = commands.add_parser("repair", help="move broken vector indexes aside (server stopped)")
    command.add_argument("data_dir", type=_data_dir, metavar="DATA_DIR")
    command.add_argument("--all", action="store_true", help="move every vector index aside, broken or not")
    command = commands.add_parser("before-start", help="boot: repair --all unless the last stop was clean")
    command.add_argument("data_dir", type=_data_dir, metavar="DATA_DIR")
    command = commands.add_parser("after-start", help="boot: keep-log, rebuild by reading, verify")
    command.add_argument("data_dir", type=_data_dir, metavar="DATA_DIR")
    with_endpoint(command)
    command = commands.add_parser("guard", help="boot: answer chroma-start.sh's start requests (runs until stopped)")
    command.add_argument("data_dir", type=_data_dir, metavar="DATA_DIR")
    with_endpoint(command)
    return parser


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    """Runs one subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    environ = dict(os.environ) if environ is None else environ
    try:
        if args.command == "keep-log":
            changed = keep_log(args.data_dir)
            log(f"keep-log: {'set' if changed else 'already set'} in {args.data_dir / DATABASE_FILE}")
            return EXIT_OK
        if args.command == "repair":
            moved = repair(args.data_dir, args.all)
            for segment, detail in moved:
                log(f"repair: moved {segment.collection_name} ({segment.collection_id}): {detail}")
            log(f"repair: {len(moved)} vector indexes moved aside; Chroma rebuilds each on its first read")
            return EXIT_OK
        if args.command == "verify":
            return run_verify(build_endpoint(args, environ), args.sample)
        if args.command == "before-start":
            return before_start(args.data_dir)
        if args.command == "after-start":
            return after_start(args.data_dir, build_endpoint(args, environ), args.sample)
        return guard(args.data_dir, build_endpoint(args, environ), args.sample)
    except UsageError as error:
        log(f"error: {error}")
        return EXIT_USAGE
    except urllib.error.URLError as error:
        hint = (
            " (check --token or CHROMA_TOKEN, and --auth-header)" if getattr(error, "code", None) in (401, 403) else ""
        )
        log(f"{args.command}: {getattr(args, 'endpoint', None) or 'endpoint'}: {_error_text(error)}{hint}")
        return EXIT_BROKEN
    except (RefusedError, sqlite3.Error, OSError) as error:
        log(f"{args.command}: refused: {error}")
        return EXIT_BROKEN


if __name__ == "__main__":
    sys.exit(main())
