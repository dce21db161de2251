"""The size catalog, the measured RAM and disk model, and how Chroma's published rule under-sizes."""

import math

import pytest

from components import sizing
from scripts import fit_sizing_model

# Chroma's single-node performance table: RAM (GB) -> largest collection at 1024 dimensions.
CHROMA_PUBLISHED = [(2, 250_000), (4, 700_000), (8, 1_700_000), (16, 3_600_000), (32, 7_500_000), (64, 15_000_000)]


@pytest.mark.parametrize(("published_ram", "embeddings"), CHROMA_PUBLISHED[2:])
def test_at_1024_dimensions_the_model_is_close_to_chromas_table(published_ram, embeddings):
    """Chroma's table works out at about 4.4 KB per 1024-d embedding, near the measured 4.5 KB."""
    assert sizing.max_embeddings(published_ram, 1024) == pytest.approx(embeddings, rel=0.10)


@pytest.mark.parametrize("run", fit_sizing_model.load_sweep()["runs"], ids=lambda run: f"{run['dimensions']}d")
def test_the_published_four_bytes_per_dimension_rule_under_sizes_every_measured_run(run):
    published = run["embeddings"] * run["dimensions"] * sizing.PUBLISHED_BYTES_PER_DIMENSION
    assert run["steady_rss_bytes"] > published, "the measured server needs more than 4 B x dims per embedding"


def test_the_published_rule_approves_a_vm_the_model_rejects():
    """10M x 384 dims: the rule asks 15.3 GiB, so a 16 GiB VM passed; it needs more than that at rest."""
    assert sizing.published_rule_memory_gib(10_000_000, 384) < 16
    assert sizing.memory_need(10_000_000, 384).steady_gib > 16
    assert sizing.required_memory_gib(10_000_000, 384) > 16


def test_required_ram_never_below_two_gib():
    assert sizing.required_memory_gib(0, 1024) == 2
    assert sizing.required_memory_gib(1000, 384) == 2


def test_required_ram_grows_with_dimensions_and_embeddings():
    assert sizing.required_memory_gib(1_000_000, 1536) > sizing.required_memory_gib(1_000_000, 768)
    assert sizing.required_memory_gib(2_000_000, 768) > sizing.required_memory_gib(1_000_000, 768)


def test_peak_is_steady_plus_the_ingest_headroom_and_required_adds_the_reserve():
    need = sizing.memory_need(5_000_000, 768)
    assert need.peak_gib - need.steady_gib == pytest.approx(sizing.ingest_headroom_bytes(768) / sizing.GIB)
    assert need.required_gib == pytest.approx(need.peak_gib + sizing.SYSTEM_RESERVE_GIB)
    assert need.steady_gib > 5_000_000 * 768 * 4 / sizing.GIB


@pytest.mark.parametrize("dimensions", [128, 384, 1024, 3072])
@pytest.mark.parametrize("memory", [4, 8, 64, 256])
def test_max_embeddings_is_the_inverse_of_required_memory(memory, dimensions):
    most = sizing.max_embeddings(memory, dimensions)
    assert most > 0
    assert sizing.required_memory_gib(most, dimensions) <= memory
    assert sizing.required_memory_gib(most + 1, dimensions) > memory


def test_below_the_floor_nothing_fits():
    assert sizing.max_embeddings(1, 1024) == 0
    assert sizing.max_embeddings(0.5, 128) == 0


@pytest.mark.parametrize(
    "family_member",
    [
        "Standard_B2s",
        "Standard_B2s_v2",
        "Standard_B2as_v2",
        "Standard_D2s_v5",
        "Standard_D2as_v5",
        "Standard_D2s_v6",
        "Standard_E2s_v5",
        "Standard_E2s_v6",
        "Standard_F2s_v2",
    ],
)
def test_catalog_covers_the_current_families(family_member):
    assert sizing.memory_gib(family_member) is not None


def test_chromas_own_example_size_is_below_the_floor():
    assert sizing.memory_gib("Standard_B1s") == 1
    assert sizing.memory_gib("Standard_B1s") < sizing.required_memory_gib(0, 1024)


def test_smallest_fitting_is_sorted_and_fits():
    fitting = sizing.smallest_fitting(6.5)
    assert fitting, "some catalog size holds 6.5 GiB"
    memories = [sizing.VM_MEMORY_GIB[name] for name in fitting]
    assert memories == sorted(memories)
    assert all(memory >= 6.5 for memory in memories)
    assert memories[0] == 8


@pytest.mark.parametrize("required", [1.5, 6.5, 14, 100, 600])
def test_smallest_fitting_suggests_no_burstable_size_while_another_fits(required):
    fitting = sizing.smallest_fitting(required)
    assert len(fitting) == 3
    assert all(sizing.family_kind(name) != "burstable" for name in fitting), fitting


def test_smallest_fitting_puts_memory_optimized_first_at_equal_memory():
    fitting = sizing.smallest_fitting(12)
    assert sizing.VM_MEMORY_GIB[fitting[0]] == 16
    assert sizing.family_kind(fitting[0]) == "memory optimized"


def test_nothing_fits_past_the_largest_size():
    largest = sizing.largest_size()
    assert sizing.smallest_fitting(sizing.VM_MEMORY_GIB[largest] + 1) == []


def test_disk_need_adds_growth_and_repair_room_the_write_log_and_caddy():
    need = sizing.disk_need(1_000_000, 1536)
    assert need.write_log_gib > 0
    assert need.growth_gib == pytest.approx(need.index_gib * 0.2)
    assert need.repair_gib == need.index_gib
    assert need.index_gib > 1_000_000 * 1536 * 4 / sizing.GIB
    parts = need.index_gib + need.growth_gib + need.repair_gib + need.write_log_gib + need.caddy_gib
    assert need.required_gb == math.ceil(parts / sizing.USABLE_DISK_FRACTION)


def test_an_empty_stack_fits_the_smallest_disk():
    assert sizing.disk_need(0, 1024).required_gb <= sizing.DISK_TIERS_GB[0]


@pytest.mark.parametrize("dimensions", [384, 1536])
@pytest.mark.parametrize("size_gb", [64, 1024])
def test_max_embeddings_on_disk_is_the_inverse_of_disk_need(size_gb, dimensions):
    most = sizing.max_embeddings_on_disk(size_gb, dimensions)
    assert sizing.disk_need(most, dimensions).required_gb <= size_gb
    assert sizing.disk_need(most + 20, dimensions).required_gb > size_gb


def test_disk_tiers():
    assert sizing.disk_tier_at_least(64) == 64
    assert sizing.disk_tier_at_least(65) == 128
    assert sizing.disk_tier_at_least(40000) is None


def test_near_matches_suggest_the_mistyped_size():
    assert "Standard_D2s_v5" in sizing.near_matches("Standard_D2s_v4")
    assert "Standard_D4s_v5" in sizing.near_matches("standard_d4s_v5")


@pytest.mark.parametrize(
    ("vm_size", "premium"),
    [("Standard_D2s_v5", True), ("Standard_B2ats_v2", True), ("Standard_D2_v5", False), ("Standard_A2_v2", False)],
)
def test_premium_storage_follows_the_s_feature_letter(vm_size, premium):
    assert sizing.supports_premium_storage(vm_size) is premium


@pytest.mark.parametrize(
    ("vm_size", "nvme"),
    [("Standard_D2s_v6", True), ("Standard_E4s_v6", True), ("Standard_D2s_v5", False), ("Standard_B2s_v2", False)],
)
def test_v6_sizes_are_nvme_only(vm_size, nvme):
    assert sizing.is_nvme_only(vm_size) is nvme
