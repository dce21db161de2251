"""scripts/measure_memory.py run for real: `chroma run` from the pinned wheel, a small load, JSON out."""

import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import measure_memory

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "measure_memory.py"
DIMENSIONS = 64
EMBEDDINGS = 2000


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dimensions", str(DIMENSIONS), "--embeddings", str(EMBEDDINGS), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def queue_rows(workdir: Path) -> int:
    with contextlib.closing(sqlite3.connect(workdir / "data" / "chroma.sqlite3")) as database:
        return database.execute("SELECT count(*) FROM embeddings_queue").fetchone()[0]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("measure") / "run"
    run = run_script("--json", "--batch", "500", "--keep", str(workdir))
    assert run.returncode == 0, run.stderr
    return run, workdir


def test_json_is_one_object_with_the_figures_the_model_needs(measured):
    run, _ = measured
    result = json.loads(run.stdout)
    for key in (
        "steady_bytes_per_embedding",
        "ingest_bytes_per_embedding",
        "ingest_peak_bytes_per_embedding",
        "disk_bytes_per_embedding",
        "baseline_rss_bytes",
        "chroma_version",
        "dimensions",
        "embeddings",
    ):
        assert key in result, key
    assert result["chroma_version"] == measure_memory.pinned_version()
    assert (result["dimensions"], result["embeddings"], result["batch"]) == (DIMENSIONS, EMBEDDINGS, 500)
    assert result["baseline_rss_bytes"] > 10 * 1024**2, "an empty chroma run is tens of MB"
    raw = DIMENSIONS * 4
    assert result["steady_bytes_per_embedding"] > raw, "the index holds at least the raw vectors"
    assert result["disk_bytes_per_embedding"] > raw
    assert result["ingest_peak_bytes_per_embedding"] >= result["ingest_bytes_per_embedding"]


def test_progress_goes_to_stderr(measured):
    run, _ = measured
    assert f"loading {DIMENSIONS}-d [" in run.stderr
    assert f"{EMBEDDINGS:,}/{EMBEDDINGS:,}" in run.stderr
    assert "restarting" in run.stderr
    assert "loading" not in run.stdout


def test_the_write_log_is_purged_by_default_and_kept_on_request(measured, tmp_path):
    _, workdir = measured
    assert queue_rows(workdir) < EMBEDDINGS
    kept = run_script("--json", "--batch", "500", "--keep-write-log", "--keep", str(tmp_path / "kept"))
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["write_log_kept"] is True
    assert queue_rows(tmp_path / "kept") == EMBEDDINGS


def test_a_server_other_than_the_pinned_one_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(measure_memory, "installed_version", lambda: "0.6.3")
    with pytest.raises(measure_memory.MeasureError, match=r"chromadb 0\.6\.3 is installed, but Pulumi\.yaml pins"):
        measure_memory.measure(DIMENSIONS, EMBEDDINGS, 500, tmp_path)
