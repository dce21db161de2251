"""Azure VM size catalog, and how much RAM and disk Chroma needs for a collection.

The catalog maps a size to its memory so that a stack too small for its data fails at
preview, not after a day of swapping. The model is measured, not Chroma's published rule
(about 4 bytes per dimension per embedding): `scripts/measure_memory.py` ran the pinned server
(`chroma run` from the chromadb wheel) over a sweep of dimensions and collection sizes, the
results are in data/chroma_memory_sweep.json, and `scripts/fit_sizing_model.py` fits the
constants below from that file. tests/test_sizing_model.py refits them and fails when they drift,
or when chromaVersion's default moves away from the version the sweep measured.

Only vectors and ids are modelled: documents and metadata add their own size on top.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

GIB = 1024**3
FLOAT32_BYTES = 4

# --- Fitted from data/chroma_memory_sweep.json (scripts/fit_sizing_model.py prints these). ---
MEASURED_CHROMA_VERSION = "1.5.9"
# Resident memory of an empty `chroma run`, the largest seen in the sweep.
SERVER_BASELINE_BYTES = 118923264
# Steady state (after a restart and queries): N x (a x dims + b) + c, where c is what a collection
# costs beyond its embeddings.
STEADY_BYTES_PER_DIMENSION = 4.006
STEADY_BYTES_PER_EMBEDDING = 388.8
STEADY_BYTES_PER_COLLECTION = 8912447
# Extra resident memory while loading (peak RSS during `add` minus steady state): h per float of
# the request in flight + h0, the line over every run of the sweep.
INGEST_HEADROOM_BYTES_PER_FLOAT = 36.511
INGEST_HEADROOM_BYTES = 111230861
# Data directory on disk (write log purged): N x (factor x the raw float32 vector + e) + f.
DISK_FACTOR = 1.0526
DISK_BYTES_PER_EMBEDDING = 61.7
DISK_BYTES_PER_COLLECTION = 21554787
# Chroma's write log (embeddings_queue) when it is kept rather than purged: l x dims + l0 per
# write, and it never shrinks. From the earlier, larger measurement in the sweep file's `reference`
# (about 15% above this sweep's own 20k-embedding figures, so the more cautious of the two).
WRITE_LOG_BYTES_PER_DIMENSION = 4.08
WRITE_LOG_BYTES_PER_EMBEDDING = 233.3
# --- end of fitted constants ---

# Chroma's single-node performance page: "Less than 2GB of RAM is not recommended", and reserve
# "at least 1 GB" for the system. The 1 GiB reserve holds the OS (Ubuntu 24.04: systemd,
# journald, the Azure agent), dockerd and containerd, and Caddy; the Chroma server's own
# baseline is measured and counted separately above.
MIN_MEMORY_GIB = 2.0
SYSTEM_RESERVE_GIB = 1.0
# One `add` request carries at most MAX_BATCH_SIZE embeddings (the server's pre-flight
# max_batch_size) and a 40 MiB body (a bigger one gets 413, probed here); Chroma's Python client
# sends float32 vectors as base64, 4 bytes in 16/3, so a request holds at most this many floats.
MAX_BATCH_SIZE = 5461
MAX_REQUEST_FLOATS = 40 * 1024**2 * 3 // 16
# The published rule, kept to show how far it under-sizes (tests/test_sizing.py).
PUBLISHED_BYTES_PER_DIMENSION = 4

# Chroma grows a collection's HNSW index by this factor when it fills (`hnsw:resize_factor`,
# default 1.2), and its files with it: a collection just past a step holds up to 20% more on disk
# than the sweep's mid-step average. After an unclean stop, the guard (scripts/chroma_data.py repair
# --all) renames every index into moved-aside/ and Chroma rebuilds it from the kept write log, so
# until someone deletes that folder the disk holds the index twice. Those, and the log itself, are
# the headroom the disk needs on top of the measured use.
HNSW_RESIZE_FACTOR = 1.2
# Caddy keeps its certificates, keys and ACME account in its data directory on the data disk
# (components/cloud_config.py CADDY_DATA_DIR). A real `caddy run` (2.6, tls internal) left 36 KB there,
# certificate, key and CA included; an ACME account and OCSP staples add a few KB. 64 MiB is ample.
CADDY_DATA_BYTES = 64 * 1024**2
# ext4 as prepare-data-disk.sh makes it (mkfs.ext4 defaults): 2.4-2.6% metadata and journal, and
# 5% reserved for root. `dumpe2fs -h` after mkfs.ext4 on 16 and 64 GiB images: (free - reserved)
# / total = 0.924 and 0.926.
USABLE_DISK_FRACTION = 0.92
# Azure managed disk sizes bill by tier; these are the tiers' sizes in GiB (P/E series).
DISK_TIERS_GB = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32767)
MAX_DISK_GB = DISK_TIERS_GB[-1]

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


def memory_gib(vm_size: str) -> float | None:
    """Memory of a catalog size, or None for a size the catalog does not know."""
    return VM_MEMORY_GIB.get(vm_size)


def near_matches(vm_size: str, count: int = 3) -> list[str]:
    """Catalog sizes that look like a mistyped one, for an error message."""
    by_lower = {name.lower(): name for name in VM_MEMORY_GIB}
    found = difflib.get_close_matches(vm_size.lower(), list(by_lower), n=count, cutoff=0.6)
    return [by_lower[name] for name in found]


def supports_premium_storage(vm_size: str) -> bool:
    """Azure marks premium-storage sizes with an 's' among the lowercase feature letters."""
    match = _SIZE_NAME.match(vm_size)
    return bool(match and "s" in match.group("features"))


def is_nvme_only(vm_size: str) -> bool:
    """v6 D and E sizes attach disks over NVMe only, and need a Gen2 image."""
    return bool(_NVME_ONLY_FAMILIES.match(vm_size))


# Burstable sizes run at a fraction of their vCPUs once their CPU credits are spent, and
# Chroma's index builds and queries use the CPU for long stretches; so suggestions list
# general-purpose (D) and memory-optimized (E) sizes first, then compute-optimized (F), and
# burstable (B) only when nothing else fits.
_FAMILY_KINDS = {"E": "memory optimized", "D": "general purpose", "F": "compute optimized", "B": "burstable"}
_FAMILY_RANK = {kind: rank for rank, kind in enumerate(_FAMILY_KINDS)}


def family_kind(vm_size: str) -> str:
    """Memory optimized, general purpose, compute optimized or burstable, from the family letter."""
    letter = vm_size.removeprefix("Standard_")[:1]
    return _FAMILY_KINDS.get(letter, "other")


def smallest_fitting(required_gib: float, count: int = 3) -> list[str]:
    """The catalog sizes with the least memory that hold `required_gib`, burstable ones last."""
    fitting = [name for name, gib in VM_MEMORY_GIB.items() if gib >= required_gib]

    def preference(name: str) -> tuple:
        letter = name.removeprefix("Standard_")[:1]
        return (letter == "B", VM_MEMORY_GIB[name], _FAMILY_RANK.get(letter, len(_FAMILY_RANK)), name)

    return sorted(fitting, key=preference)[:count]


def largest_size() -> str:
    """The catalog size with the most memory."""
    return max(VM_MEMORY_GIB, key=lambda name: VM_MEMORY_GIB[name])


def steady_bytes_per_embedding(embedding_dimensions: int) -> float:
    """Resident memory one embedding costs a running server, measured after a restart and queries."""
    return STEADY_BYTES_PER_DIMENSION * embedding_dimensions + STEADY_BYTES_PER_EMBEDDING


def ingest_headroom_bytes(embedding_dimensions: int) -> float:
    """Extra resident memory while the largest request a client can send is added, on top of the steady state.

    One writer at a time: each concurrent `add` holds its own request.
    """
    floats = min(MAX_BATCH_SIZE * embedding_dimensions, MAX_REQUEST_FLOATS)
    return INGEST_HEADROOM_BYTES_PER_FLOAT * floats + INGEST_HEADROOM_BYTES


@dataclass(frozen=True)
class MemoryNeed:
    """What a collection costs in RAM, in GiB."""

    steady_gib: float  # the Chroma server at rest with the collection loaded
    peak_gib: float  # the Chroma server while loading
    required_gib: float  # peak plus the system reserve, never under MIN_MEMORY_GIB


def memory_need(expected_embeddings: int, embedding_dimensions: int) -> MemoryNeed:
    """Chroma's steady and peak memory for the collection, and the VM memory that holds it."""
    steady = (
        SERVER_BASELINE_BYTES
        + STEADY_BYTES_PER_COLLECTION
        + expected_embeddings * steady_bytes_per_embedding(embedding_dimensions)
    )
    peak = steady + ingest_headroom_bytes(embedding_dimensions)
    required = max(MIN_MEMORY_GIB, peak / GIB + SYSTEM_RESERVE_GIB)
    return MemoryNeed(steady_gib=steady / GIB, peak_gib=peak / GIB, required_gib=required)


def required_memory_gib(expected_embeddings: int, embedding_dimensions: int) -> float:
    """VM memory that holds the collection at its peak, plus the system reserve."""
    return memory_need(expected_embeddings, embedding_dimensions).required_gib


def max_embeddings(memory: float, embedding_dimensions: int) -> int:
    """The largest collection a size with `memory` GiB holds under the model."""
    if memory < MIN_MEMORY_GIB:
        return 0
    fixed = (
        SERVER_BASELINE_BYTES
        + STEADY_BYTES_PER_COLLECTION
        + ingest_headroom_bytes(embedding_dimensions)
        + SYSTEM_RESERVE_GIB * GIB
    )
    usable = memory * GIB - fixed
    return max(0, math.floor(usable / steady_bytes_per_embedding(embedding_dimensions)))


def published_rule_memory_gib(expected_embeddings: int, embedding_dimensions: int) -> float:
    """Chroma's published rule: 4 bytes per dimension per embedding, plus 1 GiB, at least 2 GiB."""
    index_gib = expected_embeddings * embedding_dimensions * PUBLISHED_BYTES_PER_DIMENSION / GIB
    return max(MIN_MEMORY_GIB, index_gib + SYSTEM_RESERVE_GIB)


def write_log_bytes_per_embedding(embedding_dimensions: int) -> float:
    """Disk one kept write-log row costs (one per add; updates and deletes add rows too)."""
    return WRITE_LOG_BYTES_PER_DIMENSION * embedding_dimensions + WRITE_LOG_BYTES_PER_EMBEDDING


@dataclass(frozen=True)
class DiskNeed:
    """What a collection costs on the data disk, in GiB (Azure's disk "GB"), and the disk size that holds it."""

    index_gib: float  # SQLite and the HNSW segment files, as measured with the write log purged
    growth_gib: float  # room for the HNSW files' next growth step (hnsw:resize_factor)
    repair_gib: float  # a repair after an unclean stop moves the indexes aside and rebuilds: a second copy
    write_log_gib: float  # the kept write log: one row per embedding written
    caddy_gib: float  # Caddy's certificates and ACME account
    required_gb: int  # all of it, over ext4's usable fraction, rounded up


def _index_disk_bytes(embedding_dimensions: int) -> float:
    return DISK_FACTOR * FLOAT32_BYTES * embedding_dimensions + DISK_BYTES_PER_EMBEDDING


def disk_need(expected_embeddings: int, embedding_dimensions: int) -> DiskNeed:
    """The data disk the collection needs: measured use, its growth and repair room, the kept write log, Caddy."""
    index = DISK_BYTES_PER_COLLECTION + expected_embeddings * _index_disk_bytes(embedding_dimensions)
    growth = index * (HNSW_RESIZE_FACTOR - 1)
    repair = index
    write_log = expected_embeddings * write_log_bytes_per_embedding(embedding_dimensions)
    total = index + growth + repair + write_log + CADDY_DATA_BYTES
    return DiskNeed(
        index_gib=index / GIB,
        growth_gib=growth / GIB,
        repair_gib=repair / GIB,
        write_log_gib=write_log / GIB,
        caddy_gib=CADDY_DATA_BYTES / GIB,
        required_gb=math.ceil(total / USABLE_DISK_FRACTION / GIB),
    )


def max_embeddings_on_disk(size_gb: int, embedding_dimensions: int) -> int:
    """The largest collection a data disk of `size_gb` holds under the disk model."""
    copies = HNSW_RESIZE_FACTOR + 1  # the index with its growth room, and a repair's moved-aside copy
    per_embedding = copies * _index_disk_bytes(embedding_dimensions) + write_log_bytes_per_embedding(
        embedding_dimensions
    )
    fixed = copies * DISK_BYTES_PER_COLLECTION + CADDY_DATA_BYTES
    usable = size_gb * GIB * USABLE_DISK_FRACTION - fixed
    return max(0, math.floor(usable / per_embedding))


def disk_tier_at_least(size_gb: int) -> int | None:
    """The smallest Azure disk tier size that is at least `size_gb`, or None past the largest disk."""
    return next((tier for tier in DISK_TIERS_GB if tier >= size_gb), None)
