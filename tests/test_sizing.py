"""The size catalog and Chroma's RAM rule."""

import pytest

from components import sizing

# Chroma's single-node performance table: RAM (GB) -> largest collection at 1024 dimensions.
CHROMA_PUBLISHED = [(2, 250_000), (4, 700_000), (8, 1_700_000), (16, 3_600_000), (32, 7_500_000), (64, 15_000_000)]


@pytest.mark.parametrize(("published_ram", "embeddings"), CHROMA_PUBLISHED)
def test_required_ram_reproduces_chromas_table_within_ten_percent(published_ram, embeddings):
    required = sizing.required_memory_gib(embeddings, 1024)
    assert abs(required - published_ram) / published_ram <= 0.10, (
        f"{embeddings:,} embeddings: rule gives {required:.2f} GiB, Chroma's table says {published_ram} GB"
    )


def test_required_ram_never_below_two_gib():
    assert sizing.required_memory_gib(0, 1024) == 2
    assert sizing.required_memory_gib(1000, 384) == 2


def test_required_ram_grows_with_dimensions():
    assert sizing.required_memory_gib(1_000_000, 1536) > sizing.required_memory_gib(1_000_000, 768)


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


def test_max_embeddings_inverts_the_rule():
    assert sizing.max_embeddings(8, 1024) == pytest.approx(1_800_000, rel=0.05)
    assert sizing.max_embeddings(1, 1024) == 0
