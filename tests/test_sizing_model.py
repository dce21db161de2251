"""The sizing model against the committed sweep it was fitted from (data/chroma_memory_sweep.json)."""

import pytest

from components import settings, sizing
from scripts import fit_sizing_model

SWEEP = fit_sizing_model.load_sweep()
RUNS = SWEEP["runs"]
SWEEP_DIMENSIONS = (128, 384, 768, 1024, 1536, 3072)


def test_the_sweep_measured_the_version_chroma_version_defaults_to():
    default = settings.declarations()["chromaVersion"]["default"]
    assert SWEEP["chroma_version"] == default, (
        f"Pulumi.yaml's chromaVersion default is {default}, but the sizing model was measured on "
        f"{SWEEP['chroma_version']}. Re-run the sweep (the command is in data/chroma_memory_sweep.json), "
        "then scripts/fit_sizing_model.py, and update components/sizing.py and the README table."
    )
    assert default == sizing.MEASURED_CHROMA_VERSION
    assert all(run["chroma_version"] == default for run in RUNS)


def test_the_sweep_records_where_and_how_it_was_measured():
    for key in ("date", "machine", "command"):
        assert SWEEP[key], f"the sweep file has no {key}"
    assert "scripts/measure_memory.py" in SWEEP["command"]


@pytest.mark.parametrize("dimensions", SWEEP_DIMENSIONS)
def test_every_dimension_was_measured_at_two_sizes_or_more(dimensions):
    sizes = {run["embeddings"] for run in RUNS if run["dimensions"] == dimensions}
    assert len(sizes) >= 2, f"{dimensions} dims measured at {sorted(sizes)} embeddings only"


def test_the_constants_in_the_code_are_the_fit_of_the_sweep():
    fitted = fit_sizing_model.fit(SWEEP)
    in_code = {name: getattr(sizing, name) for name in fitted}
    assert in_code == fitted, (
        "components/sizing.py's constants differ from a fit of data/chroma_memory_sweep.json; "
        "paste the output of `python scripts/fit_sizing_model.py` into it"
    )


@pytest.mark.parametrize("run", RUNS, ids=lambda run: f"{run['dimensions']}d-{run['embeddings']}")
def test_the_model_holds_each_measured_run(run):
    dims, count = run["dimensions"], run["embeddings"]
    steady = sizing.STEADY_BYTES_PER_COLLECTION + count * sizing.steady_bytes_per_embedding(dims)
    assert steady == pytest.approx(run["steady_rss_bytes"], rel=0.15)
    peak = steady + sizing.ingest_headroom_bytes(dims)
    assert peak >= run["ingest_peak_rss_bytes"], "the model's peak must cover every measured peak"
    on_disk = sizing.disk_need(count, dims).index_gib * sizing.GIB
    assert on_disk >= run["disk_bytes"] * 0.85, "the disk model must not fall much short of any run"
    if run["raw_vector_bytes"] >= 50e6:  # small runs carry SQLite's fixed pages; the model over-counts them
        assert on_disk == pytest.approx(run["disk_bytes"], rel=0.15)


@pytest.mark.parametrize("run", SWEEP["reference"]["runs"], ids=lambda run: f"{run['dimensions']}d-{run['embeddings']}")
def test_the_model_agrees_with_the_earlier_larger_runs(run):
    predicted = sizing.steady_bytes_per_embedding(run["dimensions"])
    assert predicted == pytest.approx(run["steady_bytes_per_embedding"], rel=0.15)
    assert predicted > sizing.PUBLISHED_BYTES_PER_DIMENSION * run["dimensions"]


def test_the_write_log_measured_here_is_within_the_cautious_earlier_figures():
    points = SWEEP["write_log"]["points"]
    assert {point["dimensions"] for point in points} >= {384, 1536}
    for point in points:
        modelled = sizing.write_log_bytes_per_embedding(point["dimensions"])
        assert point["bytes_per_write"] <= modelled, "the model must not count less log than was measured"
        assert point["bytes_per_write"] == pytest.approx(modelled, rel=0.2)


def test_readme_capacity_table_is_generated_from_the_model():
    readme = fit_sizing_model.README.read_text(encoding="utf-8")
    assert fit_sizing_model.readme_with_table(readme) == readme, (
        "README.md's capacity table is stale; run `python scripts/fit_sizing_model.py --readme`"
    )
