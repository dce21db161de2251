"""The `zone` key: a zone-pinned VM, a ZRS disk and a zone-redundant IP; refusals; failover as a config change.

Settings rules are checked with load_settings; the resources with the real __main__.py under mocks
(preview=False), comparing what is registered with and without a zone, and between two zones.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ProgramRun, plain, run_program

from components import zones
from components.settings import SettingsError, load_settings

VM = "azure-native:compute:VirtualMachine"
DISK = "azure-native:compute:Disk"
PIP = "azure-native:network:PublicIPAddress"
NIC = "azure-native:network:NetworkInterface"
AZURE = {"target": "azure"}
REGION = "westeurope"


def registered(run: ProgramRun) -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource by type and name: its inputs (secrets unwrapped) and the options that decide replacement."""
    return {
        (resource.type, resource.name): {
            "inputs": plain(resource.inputs),
            "parent": resource.parent,
            "protect": resource.protect,
            "delete_before_replace": resource.delete_before_replace,
            "replace_on_changes": resource.replace_on_changes,
        }
        for resource in run.resources
    }


def differences(before: dict, after: dict, path: str = "") -> dict[str, tuple[Any, Any]]:
    """Leaf paths whose values differ between two nested dicts, as {path: (before, after)}."""
    found = {}
    for key in sorted(set(before) | set(after), key=str):
        here = f"{path}.{key}" if path else str(key)
        left, right = before.get(key), after.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found |= differences(left, right, here)
        elif left != right:
            found[here] = (left, right)
    return found


@pytest.fixture(scope="module")
def unset_run() -> ProgramRun:
    return run_program("dev")


@pytest.fixture(scope="module")
def zone1_run() -> ProgramRun:
    return run_program("dev", {"zone": "1"})


@pytest.fixture(scope="module")
def zone2_run() -> ProgramRun:
    return run_program("dev", {"zone": "2"})


# --- Settings ---------------------------------------------------------------------------------


def test_zone_is_unset_by_default_and_keeps_the_lrs_disk():
    loaded = load_settings(AZURE, location=REGION)
    assert loaded.zone is None
    assert loaded.data_disk_sku == "Premium_LRS"


@pytest.mark.parametrize(
    ("vm_size", "extra", "expected_sku"),
    [
        ("Standard_D2s_v5", {}, "Premium_ZRS"),
        ("Standard_L8_v3", {"vmMemoryGib": "64"}, "StandardSSD_ZRS"),  # no premium storage
    ],
)
def test_a_zone_defaults_the_disk_to_the_zrs_sku_that_fits_the_size(vm_size, extra, expected_sku):
    loaded = load_settings({**AZURE, "zone": "3", "vmSize": vm_size, **extra}, location=REGION)
    assert loaded.zone == "3"
    assert loaded.data_disk_sku == expected_sku


def test_a_zone_written_as_a_number_in_the_stack_file_is_read():
    assert load_settings({**AZURE, "zone": 2.0}, location=REGION).zone == "2"


@pytest.mark.parametrize("value", ["0", "4", "zone1", "1,2"])
def test_a_zone_that_is_not_1_2_or_3_is_refused(value):
    with pytest.raises(SettingsError) as raised:
        load_settings({**AZURE, "zone": value}, location=REGION)
    (problem,) = raised.value.problems
    assert problem.startswith(f"chroma-infra:zone = {value!r}: must be an availability zone, 1, 2 or 3")
    assert "Fix: pulumi config set zone 1, or pulumi config rm zone." in problem


@pytest.mark.parametrize("sku", ["Premium_LRS", "StandardSSD_LRS", "Standard_LRS"])
def test_a_zone_with_an_explicit_lrs_disk_is_refused_naming_both_keys_and_why(sku):
    with pytest.raises(SettingsError) as raised:
        load_settings({**AZURE, "zone": "1", "dataDiskSku": sku}, location=REGION)
    (problem,) = raised.value.problems
    assert problem.startswith(f"chroma-infra:dataDiskSku = {sku!r}: is locally redundant")
    assert "chroma-infra:zone = '1'" in problem
    assert "cannot follow the VM to another" in problem, "the error says why"
    assert "Fix: pulumi config rm dataDiskSku (a zone defaults to Premium_ZRS)" in problem


def test_an_explicit_zrs_disk_without_a_zone_is_allowed():
    assert load_settings({**AZURE, "dataDiskSku": "StandardSSD_ZRS"}, location=REGION).data_disk_sku == (
        "StandardSSD_ZRS"
    )


def test_a_premium_zrs_disk_on_a_size_without_premium_storage_suggests_the_standard_zrs():
    with pytest.raises(SettingsError) as raised:
        load_settings(
            {**AZURE, "zone": "1", "dataDiskSku": "Premium_ZRS", "vmSize": "Standard_L8_v3", "vmMemoryGib": "64"},
            location=REGION,
        )
    (problem,) = raised.value.problems
    assert "needs a VM size with premium storage" in problem
    assert "Fix: use StandardSSD_ZRS" in problem, "the suggested fix must not be refused in turn"


@pytest.mark.parametrize("region", ["westcentralus", "North Central US", "ukwest"])
def test_a_zone_in_a_region_without_zones_is_refused_and_says_what_to_do_if_the_list_is_old(region):
    with pytest.raises(SettingsError) as raised:
        load_settings({**AZURE, "zone": "2"}, location=region)
    (problem,) = raised.value.problems
    assert problem.startswith("chroma-infra:zone = '2' needs a region with availability zones")
    assert f"azure-native:location = {region!r} has none" in problem
    assert "Fix: pulumi config rm zone, or deploy to a zonal region" in problem
    assert zones.ZONAL_REGIONS_SOURCE in problem
    assert zones.ZONAL_REGIONS_AS_OF in problem
    assert "add it to ZONAL_REGIONS in components/zones.py" in problem, "how to proceed when the list is old"


@pytest.mark.parametrize("region", ["westeurope", "West Europe", "EastUS2", "swedencentral"])
def test_a_zone_in_a_zonal_region_is_accepted_however_the_region_is_written(region):
    assert load_settings({**AZURE, "zone": "1"}, location=region).zone == "1"


def test_the_local_target_ignores_the_zone():
    loaded = load_settings({"target": "local", "zone": "1"}, location=None)
    assert loaded.target == "local"


def test_the_region_list_is_programmatic_names_with_its_source_and_date():
    assert all(name == zones.region_name(name) for name in zones.ZONAL_REGIONS)
    assert {"westeurope", "eastus", "eastus2", "northeurope", "uksouth"} <= zones.ZONAL_REGIONS
    assert not {"westus", "westcentralus", "northcentralus", "ukwest", "canadaeast"} & zones.ZONAL_REGIONS
    assert zones.ZONAL_REGIONS_SOURCE.startswith("https://learn.microsoft.com/")
    assert len(zones.ZONAL_REGIONS_AS_OF) == len("2025-09-23")


def test_a_bad_zone_fails_the_real_program_before_any_resource():
    with pytest.raises(SettingsError) as raised:
        run_program("dev", {"zone": "1", "dataDiskSku": "Premium_LRS", "azure-native:location": "westus"})
    message = str(raised.value)
    assert "2 problem(s)" in message, "both the LRS disk and the region are reported at once"
    assert "chroma-infra:dataDiskSku = 'Premium_LRS'" in message
    assert "azure-native:location = 'westus' has none" in message


# --- Resources under mocks --------------------------------------------------------------------


def test_zone_unset_registers_no_zone_anywhere(unset_run):
    for resource in unset_run.resources:
        assert "zones" not in resource.inputs, f"{resource.type} {resource.name} has zones without a zone set"
    assert unset_run.one(DISK).inputs["sku"]["name"] == "Premium_LRS"


def test_a_zone_changes_exactly_the_vm_zone_the_ip_zones_and_the_disk_sku(unset_run, zone1_run):
    """Zone unset is today's stack: a zone adds these three changes and nothing else."""
    before, after = registered(unset_run), registered(zone1_run)
    assert before.keys() == after.keys(), "a zone adds or removes no resource"
    changed = {
        (key[0], path): change for key in before for path, change in differences(before[key], after[key]).items()
    }
    assert changed == {
        (VM, "inputs.zones"): (None, ["1"]),
        (PIP, "inputs.zones"): (None, ["1", "2", "3"]),
        (DISK, "inputs.sku.name"): ("Premium_LRS", "Premium_ZRS"),
    }


def test_the_disk_is_regional_zrs_and_the_ip_spans_every_zone(zone1_run):
    disk = zone1_run.one(DISK).inputs
    assert disk["sku"]["name"] == "Premium_ZRS"
    assert "zones" not in disk, "a ZRS disk is regional; a zone on it would pin it"
    assert zone1_run.one(PIP).inputs["zones"] == list(zones.ZONES)
    assert zone1_run.one(PIP).inputs["sku"]["name"] == "Standard", "only a Standard IP can be zone-redundant"
    assert zone1_run.one(VM).inputs["zones"] == ["1"]


def test_failover_from_zone_1_to_2_changes_only_the_vms_zone(zone1_run, zone2_run):
    zone1, zone2 = registered(zone1_run), registered(zone2_run)
    assert zone1.keys() == zone2.keys()
    for key in (k for k in zone1 if k[0] in (DISK, PIP, NIC)):
        assert zone1[key] == zone2[key], f"{key} must stay as it is through a failover"
    changed = {key: differences(zone1[key], zone2[key]) for key in zone1 if zone1[key] != zone2[key]}
    assert changed == {(VM, "chroma-vm"): {"inputs.zones": (["1"], ["2"])}}, "only the VM's zone differs"
    assert (
        plain(zone1_run.one(VM).inputs)["storageProfile"]["dataDisks"]
        == plain(zone2_run.one(VM).inputs)["storageProfile"]["dataDisks"]
    ), "the new VM attaches the same disk"


def test_a_zone_change_replaces_the_vm_old_one_first(zone1_run):
    vm = zone1_run.one(VM)
    assert "zones" in vm.replace_on_changes, "Azure cannot move a VM to another zone in place"
    assert vm.delete_before_replace, "the ZRS disk and the NIC attach to one VM at a time"
    assert zone1_run.one(DISK).protect, "the data disk stays protected through a failover"
    (attached,) = plain(vm.inputs)["storageProfile"]["dataDisks"]
    assert attached["deleteOption"] == "Detach", "deleting the old VM must leave the data disk"
