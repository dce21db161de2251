"""Azure VM size catalog and Chroma's single-node RAM rule.

The catalog maps a size to its memory so that a stack too small for its data fails at
preview, not after a day of swapping. The RAM rule is Chroma's published one
(docs: single-node performance): about 4 bytes per dimension per embedding, plus memory
for the system, and never less than 2 GiB.
"""

from __future__ import annotations

import difflib
import re

GIB = 1024**3
MIN_MEMORY_GIB = 2.0
SYSTEM_RESERVE_GIB = 1.0
BYTES_PER_DIMENSION = 4

# Memory in GiB, from the Azure size pages of each family (Microsoft Learn, sizes/*-series).
VM_MEMORY_GIB: dict[str, float] = {
    # B-series v1 (burstable)
    "Standard_B1ls": 0.5,
    "Standard_B1s": 1,
    "Standard_B1ms": 2,
    "Standard_B2s": 4,
    "Standard_B2ms": 8,
    "Standard_B4ms": 16,
    "Standard_B8ms": 32,
    "Standard_B12ms": 48,
    "Standard_B16ms": 64,
    "Standard_B20ms": 80,
    # Bsv2 (burstable, Intel)
    "Standard_B2ts_v2": 1,
    "Standard_B2ls_v2": 4,
    "Standard_B2s_v2": 8,
    "Standard_B4ls_v2": 8,
    "Standard_B4s_v2": 16,
    "Standard_B8ls_v2": 16,
    "Standard_B8s_v2": 32,
    "Standard_B16ls_v2": 32,
    "Standard_B16s_v2": 64,
    "Standard_B32ls_v2": 64,
    "Standard_B32s_v2": 128,
    # Basv2 (burstable, AMD)
    "Standard_B2ats_v2": 1,
    "Standard_B2als_v2": 4,
    "Standard_B2as_v2": 8,
    "Standard_B4als_v2": 8,
    "Standard_B4as_v2": 16,
    "Standard_B8als_v2": 16,
    "Standard_B8as_v2": 32,
    "Standard_B16als_v2": 32,
    "Standard_B16as_v2": 64,
    "Standard_B32als_v2": 64,
    "Standard_B32as_v2": 128,
    # Dsv5 (general purpose, Intel)
    "Standard_D2s_v5": 8,
    "Standard_D4s_v5": 16,
    "Standard_D8s_v5": 32,
    "Standard_D16s_v5": 64,
    "Standard_D32s_v5": 128,
    "Standard_D48s_v5": 192,
    "Standard_D64s_v5": 256,
    "Standard_D96s_v5": 384,
    # Dasv5 (general purpose, AMD)
    "Standard_D2as_v5": 8,
    "Standard_D4as_v5": 16,
    "Standard_D8as_v5": 32,
    "Standard_D16as_v5": 64,
    "Standard_D32as_v5": 128,
    "Standard_D48as_v5": 192,
    "Standard_D64as_v5": 256,
    "Standard_D96as_v5": 384,
    # Dsv6 (general purpose, Intel, NVMe only)
    "Standard_D2s_v6": 8,
    "Standard_D4s_v6": 16,
    "Standard_D8s_v6": 32,
    "Standard_D16s_v6": 64,
    "Standard_D32s_v6": 128,
    "Standard_D48s_v6": 192,
    "Standard_D64s_v6": 256,
    "Standard_D96s_v6": 384,
    "Standard_D128s_v6": 512,
    "Standard_D192s_v6": 768,
    # Esv5 (memory optimized, Intel)
    "Standard_E2s_v5": 16,
    "Standard_E4s_v5": 32,
    "Standard_E8s_v5": 64,
    "Standard_E16s_v5": 128,
    "Standard_E20s_v5": 160,
    "Standard_E32s_v5": 256,
    "Standard_E48s_v5": 384,
    "Standard_E64s_v5": 512,
    "Standard_E96s_v5": 672,
    "Standard_E104is_v5": 672,
    # Esv6 (memory optimized, Intel, NVMe only)
    "Standard_E2s_v6": 16,
    "Standard_E4s_v6": 32,
    "Standard_E8s_v6": 64,
    "Standard_E16s_v6": 128,
    "Standard_E20s_v6": 160,
    "Standard_E32s_v6": 256,
    "Standard_E48s_v6": 384,
    "Standard_E64s_v6": 512,
    "Standard_E96s_v6": 768,
    "Standard_E128s_v6": 1024,
    "Standard_E192is_v6": 1832,
    # Fsv2 (compute optimized)
    "Standard_F2s_v2": 4,
    "Standard_F4s_v2": 8,
    "Standard_F8s_v2": 16,
    "Standard_F16s_v2": 32,
    "Standard_F32s_v2": 64,
    "Standard_F48s_v2": 96,
    "Standard_F64s_v2": 128,
    "Standard_F72s_v2": 144,
}

# Standard_<family letters><vCPUs>[-<constrained vCPUs>]<feature letters>[_v<N>]
_SIZE_NAME = re.compile(r"^Standard_[A-Z]+\d+(?:-\d+)?(?P<features>[a-z]*)(?:_v(?P<version>\d+))?$")
# Families whose v6 generation has no SCSI controller: data disks are NVMe namespaces.
_NVME_ONLY_FAMILIES = re.compile(r"^Standard_[DE]\d+[a-z]*_v6$")


def required_memory_gib(expected_embeddings: int, embedding_dimensions: int) -> float:
    """RAM Chroma needs to hold the collection in memory, plus a reserve for the system."""
    index_gib = expected_embeddings * embedding_dimensions * BYTES_PER_DIMENSION / GIB
    return max(MIN_MEMORY_GIB, index_gib + SYSTEM_RESERVE_GIB)


def memory_gib(vm_size: str) -> float | None:
    """Memory of a catalog size, or None for a size the catalog does not know."""
    return VM_MEMORY_GIB.get(vm_size)


def near_matches(vm_size: str, count: int = 3) -> list[str]:
    """Catalog sizes that look like a mistyped one, for an error message."""
    by_lower = {name.lower(): name for name in VM_MEMORY_GIB}
    found = difflib.get_close_matches(vm_size.lower(), list(by_lower), n=count, cutoff=0.6)
    return [by_lower[name] for name in found]


def smallest_fitting(required_gib: float, count: int = 3) -> list[str]:
    """The catalog sizes with the least memory that still hold `required_gib`."""
    fitting = [name for name, gib in VM_MEMORY_GIB.items() if gib >= required_gib]
    fitting.sort(key=lambda name: (VM_MEMORY_GIB[name], name))
    return fitting[:count]


def supports_premium_storage(vm_size: str) -> bool:
    """Azure marks premium-storage sizes with an 's' among the lowercase feature letters."""
    match = _SIZE_NAME.match(vm_size)
    return bool(match and "s" in match.group("features"))


def is_nvme_only(vm_size: str) -> bool:
    """v6 D and E sizes attach disks over NVMe only, and need a Gen2 image."""
    return bool(_NVME_ONLY_FAMILIES.match(vm_size))


def max_embeddings(memory: float, embedding_dimensions: int) -> int:
    """The largest collection a size with `memory` GiB holds under the same rule."""
    usable_bytes = max(0.0, memory - SYSTEM_RESERVE_GIB) * GIB
    return int(usable_bytes // (embedding_dimensions * BYTES_PER_DIMENSION))
