"""Availability zones: which Azure regions have them, and which data disk SKUs can follow a VM between them.

Chroma's single-node server has no replication, so high availability here means one VM pinned to
a zone, a zone-redundant (ZRS) data disk that any zone can attach, and a zone-redundant public IP.
A failover is a config change (`zone`), after which only the VM is replaced.

The region list is the one place this project records which regions have zones. Azure adds zones
to regions over time, so the list can fall behind; the settings error says how to update it.
"""

from __future__ import annotations

ZONES = ("1", "2", "3")

# Regions whose "Availability zone support" column is ticked in Microsoft's "Azure regions list"
# (public cloud), by programmatic name: https://learn.microsoft.com/azure/reliability/regions-list
# Page dated 2025-09-23 (MicrosoftDocs/reliability-docs, articles/reliability/regions-list.md);
# copied here on 2026-11-26. Sovereign clouds (US Gov, China) are not in that page, nor here.
ZONAL_REGIONS_SOURCE = "https://learn.microsoft.com/azure/reliability/regions-list"
ZONAL_REGIONS_AS_OF = "2025-09-23"
ZONAL_REGIONS = frozenset(
    [
        "australiaeast",
        "austriaeast",
        "belgiumcentral",
        "brazilsouth",
        "canadacentral",
        "centralindia",
        "centralus",
        "chilecentral",
        "denmarkeast",
        "eastasia",
        "eastus",
        "eastus2",
        "francecentral",
        "germanywestcentral",
        "indonesiacentral",
        "israelcentral",
        "italynorth",
        "japaneast",
        "japanwest",
        "koreacentral",
        "malaysiawest",
        "mexicocentral",
        "newzealandnorth",
        "northeurope",
        "norwayeast",
        "polandcentral",
        "qatarcentral",
        "southafricanorth",
        "southcentralus",
        "southeastasia",
        "spaincentral",
        "swedencentral",
        "switzerlandnorth",
        "uaenorth",
        "uksouth",
        "westeurope",
        "westus2",
        "westus3",
    ]
)

# A zonal LRS disk lives in one zone and cannot attach to a VM in another, so with a zone set the
# data disk must be ZRS: synchronously copied across the region's three zones.
ZONE_REDUNDANT_DISK_SKUS = ("Premium_ZRS", "StandardSSD_ZRS")


def region_name(location: str) -> str:
    """The programmatic name of a region: 'West Europe' and 'westeurope' are the same region."""
    return location.replace(" ", "").lower()


def has_zones(location: str) -> bool:
    """Whether the region had availability zones when the list was copied."""
    return region_name(location) in ZONAL_REGIONS


def default_data_disk_sku(zone: str | None, premium_storage: bool) -> str:
    """The data disk SKU for a VM: zone-redundant when pinned to a zone, premium when the size allows."""
    tier = "Premium" if premium_storage else "StandardSSD"
    return f"{tier}_ZRS" if zone else f"{tier}_LRS"


def is_zone_redundant(sku: str) -> bool:
    """Whether a disk of this SKU survives the loss of a zone and attaches in any zone."""
    return sku in ZONE_REDUNDANT_DISK_SKUS
