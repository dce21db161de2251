"""Stack config, turned into one frozen and fully validated `Settings` object.

Declarations (type, description, default, secret) live only in Pulumi.yaml. This module reads
them from there, so the Pulumi CLI and the program (and the tests, which run without a CLI)
apply the same defaults. Every problem is collected and reported at once, each naming the key,
the value and the fix, before any resource is registered.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pulumi
import yaml

from components import sizing, zones
from components.backup import BACKUP_INTERVALS_HOURS, MAX_SCHEDULED_SNAPSHOTS, retained_snapshots
from components.runtime import AUTH_HEADERS, GRANULARITIES, TOKEN68, OtelSettings

PROJECT = "chroma-infra"
PROJECT_FILE = Path(__file__).resolve().parent.parent / "Pulumi.yaml"
TARGETS = ("azure", "local")
SECRET_SHOWN = "[secret]"  # noqa: S105 - what is shown instead of a secret
DATA_DISK_SKUS = ("Premium_LRS", "StandardSSD_LRS", "Standard_LRS", "Premium_ZRS", "StandardSSD_ZRS")
PREMIUM_DATA_DISK_SKUS = ("Premium_LRS", "Premium_ZRS")
MIN_TOKEN_LENGTH = 16
# Far above any generated token; a longer one fails only after resources exist (header and file limits).
MAX_TOKEN_LENGTH = 1024
MIN_RSA_BITS = 2048  # Azure refuses shorter RSA keys
MIN_CHROMA_MAJOR = 1

_VERSION_TAG = re.compile(r"^(?P<major>\d+)\.\d+\.\d+(?:-[0-9A-Za-z.]+)?$")
# Azure: 3-63 characters, lowercase letters, digits and hyphens, starting with a letter.
_DNS_LABEL = re.compile(r"^[a-z][a-z0-9-]{1,61}[a-z0-9]$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# Letters, digits and the local-part symbols that mean nothing to the Caddyfile: no quote, backslash,
# braces ({$VAR} is substituted) or backtick.
_EMAIL = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
# What OTLP header values and the service name may hold: visible ASCII and spaces.
_PRINTABLE = re.compile(r"^[\x20-\x7e]+$")
_LINUX_USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Names Azure refuses for a VM's admin account.
_RESERVED_USERNAMES = frozenset(
    [
        "administrator",
        "admin",
        "user",
        "user1",
        "test",
        "user2",
        "test1",
        "user3",
        "admin1",
        "1",
        "123",
        "a",
        "actuser",
        "adm",
        "admin2",
        "aspnet",
        "backup",
        "console",
        "david",
        "guest",
        "john",
        "owner",
        "root",
        "server",
        "sql",
        "support",
        "support_388945a0",
        "sys",
        "test2",
        "test3",
        "user4",
        "user5",
    ]
)
# A restore source: /subscriptions/<id>/resourceGroups/<group>/providers/Microsoft.Compute/{disks|snapshots}/<name>.
_DISK_SOURCE_ID = re.compile(
    r"^/subscriptions/[0-9a-fA-F-]{36}/resourceGroups/[-\w.()]{1,90}/providers/Microsoft\.Compute/"
    r"(disks|snapshots)/[-\w.]{1,80}$",
    re.IGNORECASE,
)
_SSH_KEY = re.compile(r"^(ssh-rsa|ssh-ed25519|ecdsa-sha2-nistp(256|384|521)) ([A-Za-z0-9+/]+={0,3})( .*)?$")
_ECDSA_POINT_BYTES = {"nistp256": 65, "nistp384": 97, "nistp521": 133}


class SettingsError(pulumi.RunError):
    """Stack config that cannot be deployed; the message lists every problem with its fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"{len(problems)} problem(s) in the stack config; nothing was deployed:\n{lines}")


@dataclass(frozen=True)
class Settings:
    """Everything a target needs, validated; secrets are kept out of repr()."""

    target: str
    chroma_version: str
    auth_header: str
    auth_token: str | None = field(repr=False)
    otel_endpoint: str | None
    otel_service_name: str
    otel_headers: str | None = field(repr=False)
    otel_granularity: str | None
    vm_size: str
    vm_memory_gib: float
    expected_embeddings: int
    embedding_dimensions: int
    data_disk_size_gb: int
    data_disk_sku: str
    zone: str | None
    data_disk_source_id: str | None
    backup_enabled: bool
    backup_interval_hours: int
    backup_retention_days: int
    protect_data_disk: bool
    admin_username: str
    ssh_public_key: str | None
    ssh_allowed_cidrs: tuple[str, ...]
    allowed_cidrs: tuple[str, ...]
    dns_label: str | None
    acme_email: str | None
    host_port: int
    location: str | None

    @property
    def otel(self) -> OtelSettings | None:
        """OpenTelemetry export, or None when no endpoint is set."""
        if not self.otel_endpoint or self.otel_granularity == "none":
            return None
        return OtelSettings(self.otel_endpoint, self.otel_service_name, self.otel_headers, self.otel_granularity)

    @property
    def ssh_enabled(self) -> bool:
        """SSH gets an inbound rule only when someone is allowed to use it."""
        return bool(self.ssh_allowed_cidrs)


@cache
def declarations() -> dict[str, dict[str, Any]]:
    """The `config:` block of Pulumi.yaml: the one place keys, types and defaults are declared."""
    project = yaml.safe_load(PROJECT_FILE.read_text(encoding="utf-8"))
    return dict(project["config"])


def secret_keys() -> frozenset[str]:
    """Keys declared secret, whose values never appear in a message."""
    return frozenset(key for key, spec in declarations().items() if spec.get("secret"))


class _Reader:
    """Reads raw config values by their declared type, collecting problems instead of raising."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        unknown = sorted(set(raw) - set(declarations()))
        self.raw = raw
        self.problems: list[str] = [
            f"{PROJECT}:{key} is not a setting of this project. Fix: remove it, or check its "
            f"spelling against Pulumi.yaml ({', '.join(sorted(declarations()))})."
            for key in unknown
        ]

    def shown(self, key: str, value: Any) -> str:
        return SECRET_SHOWN if key in secret_keys() else repr(value)

    def problem(self, key: str, value: Any, message: str, shown: str | None = None) -> None:
        self.problems.append(f"{PROJECT}:{key} = {shown or self.shown(key, value)}: {message}")

    def value(self, key: str) -> Any:
        value = self.raw.get(key)
        if value is None or value == "":
            return declarations()[key].get("default")
        return value

    def string(self, key: str) -> str | None:
        value = self.value(key)
        text = "" if value is None else str(value).strip()
        return text or None

    def integer(self, key: str, minimum: int, maximum: int | None = None) -> int:
        value = self.value(key)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not math.isfinite(number) or number != int(number) or number < minimum or (maximum and number > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum else f"of at least {minimum}"
            self.problem(key, value, f"must be a whole number {bounds}. Fix: pulumi config set {key} <number>.")
            return minimum
        return int(number)

    def boolean(self, key: str) -> bool:
        value = self.value(key)
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        self.problem(key, value, f"must be true or false. Fix: pulumi config set {key} true.")
        return True

    def string_list(self, key: str) -> list[str]:
        value = self.value(key)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.problem(
                key,
                self.raw.get(key),
                f"must be a list of strings. Fix: pulumi config set --path '{key}[0]' <value>.",
            )
            return []
        return value


def _cidrs(reader: _Reader, key: str) -> tuple[str, ...]:
    cidrs = []
    for entry in reader.string_list(key):
        try:
            network = ipaddress.ip_network(entry.strip(), strict=True)
            if network.version != 4:
                reader.problem(
                    key,
                    entry,
                    "is an IPv6 range, but the VM has only an IPv4 address, so it would let no one in. "
                    "Fix: list the IPv4 ranges to allow, e.g. 203.0.113.0/24.",
                )
                continue
            cidrs.append(str(network))
        except ValueError as error:
            hint = ""
            with contextlib.suppress(ValueError):
                hint = f" Did you mean {ipaddress.ip_network(entry.strip(), strict=False)}?"
            reader.problem(key, entry, f"is not a CIDR range ({error}).{hint} Fix: use a form like 203.0.113.0/24.")
    return tuple(cidrs)


def _otel_headers(reader: _Reader) -> str | None:
    """Accepts `k=v,k2=v2` or a map; returns the `k=v,k2=v2` form Chroma's exporter honours."""
    key = "otelHeaders"
    value = reader.value(key)
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            reader.problem(key, value, "looks like a map but is not valid JSON. Fix: use k=v,k2=v2.")
            return None
    if isinstance(value, Mapping):
        pairs = [(str(name), str(text)) for name, text in value.items()]
    else:
        pairs = []
        for number, part in enumerate(str(value).split(","), start=1):
            name, sep, text = part.partition("=")
            if not sep:
                reader.problem(key, value, f"entry {number} has no '='. Fix: use k=v,k2=v2.")
                return None
            pairs.append((name, text))
    for number, (name, text) in enumerate(pairs, start=1):
        if not _HEADER_NAME.match(name.strip()) or not text.strip() or not _PRINTABLE.match(text.strip()):
            reader.problem(
                key,
                value,
                f"entry {number} is not a header name and a non-empty value of printable ASCII. "
                'Fix: use k=v,k2=v2, or a map such as {"x-api-key": "v"} for values holding commas.',
            )
            return None
    # The exporter percent-decodes each value (OTEL_EXPORTER_OTLP_HEADERS is W3C Baggage-like), so a
    # value holding %, "," or "=" would arrive changed unless encoded here.
    return ",".join(f"{name.strip()}={quote(text.strip(), safe='')}" for name, text in pairs)


def _otel_endpoint(reader: _Reader) -> str | None:
    key = "otelEndpoint"
    value = reader.string(key)
    if not value:
        return None
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not port
        or parts.path not in ("", "/")
        or "@" in parts.netloc
        or parts.query
        or parts.fragment
        or "?" in value
        or "#" in value
    ):
        reader.problem(
            key,
            value,
            "must be an OTLP/gRPC URL of the form http(s)://host:port, with no path, user, password, query or "
            "fragment (give credentials in otelHeaders). "
            "Fix: pulumi config set otelEndpoint http://collector.example.com:4317.",
            "[not shown: it may hold a password]" if "@" in parts.netloc else None,
        )
        return None
    return value.rstrip("/")


def _auth_token(reader: _Reader) -> str | None:
    key = "authToken"
    token = reader.string(key)
    if token is None:
        return None
    if not MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH or not TOKEN68.match(token):
        reader.problem(
            key,
            token,
            f"has {len(token)} characters; it needs {MIN_TOKEN_LENGTH} to {MAX_TOKEN_LENGTH}, all of them letters, "
            'digits or -._~+/ (RFC 6750 token68). Fix: pulumi config set --secret authToken "$(openssl rand -hex 32)", '
            "or pulumi config rm authToken to have one generated.",
        )
    return token


def _chroma_version(reader: _Reader) -> str:
    key = "chromaVersion"
    version = reader.string(key) or ""
    match = _VERSION_TAG.match(version)
    if not match:
        reader.problem(key, version, "is not a version tag. Fix: pin one, e.g. pulumi config set chromaVersion 1.5.9.")
    elif int(match.group("major")) < MIN_CHROMA_MAJOR:
        reader.problem(key, version, "is a 0.x release; this project runs Chroma 1.x. Fix: use 1.0.0 or later.")
    return version


def _vm_memory(reader: _Reader, vm_size: str) -> float:
    override = reader.integer("vmMemoryGib", minimum=0)
    if override:
        return float(override)
    memory = sizing.memory_gib(vm_size)
    if memory is None:
        near = sizing.near_matches(vm_size)
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        reader.problem(
            "vmSize",
            vm_size,
            f"is not in the size catalog.{hint} Fix: use a catalog size, or give its RAM with "
            "pulumi config set vmMemoryGib <GiB>.",
        )
        return 0.0
    return memory


def _check_ram(reader: _Reader, vm_size: str, memory: float, embeddings: int, dimensions: int) -> None:
    if not memory:
        return
    need = sizing.memory_need(embeddings, dimensions)
    if memory >= need.required_gib:
        return
    fitting = sizing.smallest_fitting(need.required_gib)
    if fitting:
        names = ", ".join(
            f"{name} ({sizing.VM_MEMORY_GIB[name]:g} GiB, {sizing.family_kind(name)})" for name in fitting
        )
        fix = (
            f"Fix: pulumi config set vmSize {fitting[0]}. Smallest that fit: {names}; burstable sizes come last, "
            "as they throttle once their CPU credits run out."
        )
    else:
        largest = sizing.largest_size()
        fix = _beyond_one_node(
            f"no size in the catalog has {need.required_gib:,.0f} GiB (the largest, {largest}, has "
            f"{sizing.VM_MEMORY_GIB[largest]:g} GiB; for a bigger size outside it, such as the M-series, "
            "set vmMemoryGib)"
        )
    floor = f" (Chroma's floor is {sizing.MIN_MEMORY_GIB:g} GiB)" if need.required_gib == sizing.MIN_MEMORY_GIB else ""
    reader.problem(
        "vmSize",
        vm_size,
        f"has {memory:g} GiB of RAM; {embeddings:,} embeddings of {dimensions} dimensions need "
        f"{need.required_gib:,.1f} GiB{floor}: Chroma takes {need.steady_gib:,.1f} GiB at rest and "
        f"{need.peak_gib:,.1f} GiB while loading, plus {sizing.SYSTEM_RESERVE_GIB:g} GiB for the OS, Docker and Caddy. "
        f"It holds about {sizing.max_embeddings(memory, dimensions):,} of them. {fix}",
    )


def _beyond_one_node(what: str) -> str:
    return (
        f"Nothing here fits: {what}. One Chroma node is the limit of this stack; beyond it, split the data across "
        "several stacks (by tenant or collection), or use distributed Chroma (Chroma Cloud, or Chroma's "
        "distributed deployment on Kubernetes), which this project does not deploy."
    )


def _check_data_disk(reader: _Reader, size_gb: int, embeddings: int, dimensions: int) -> None:
    key = "dataDiskSizeGb"
    if any(problem.startswith(f"{PROJECT}:{key} ") for problem in reader.problems):
        return
    need = sizing.disk_need(embeddings, dimensions)
    if size_gb >= need.required_gb:
        return
    tier = sizing.disk_tier_at_least(need.required_gb)
    if tier is None:
        fix = _beyond_one_node(f"the largest managed disk is {sizing.MAX_DISK_GB:,} GB")
    else:
        billed = "" if tier == need.required_gb else f" (disks bill by tier; {tier} is the tier that holds it)"
        fix = f"Fix: pulumi config set {key} {tier}{billed}."
    reader.problem(
        key,
        size_gb,
        f"is too small for {embeddings:,} embeddings of {dimensions} dimensions: they need {need.required_gb:,} GB "
        f"({need.index_gib:,.1f} GB of index, {need.growth_gib:,.1f} GB for its next growth step and "
        f"{need.repair_gib:,.1f} GB for a copy a repair moves aside, {need.write_log_gib:,.1f} GB of kept write log, "
        f"{need.caddy_gib * 1024:.0f} MB for Caddy, over the "
        f"{sizing.USABLE_DISK_FRACTION:.0%} of a disk ext4 leaves usable). It holds about "
        f"{sizing.max_embeddings_on_disk(size_gb, dimensions):,} of them. {fix}",
    )


def _zone(reader: _Reader, target: str, location: str | None) -> str | None:
    key = "zone"
    value = reader.value(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a number in the stack file
    zone = str(value).strip() if value is not None else ""
    if not zone:
        return None
    if zone not in zones.ZONES:
        reader.problem(
            key,
            value,
            f"must be an availability zone, {', '.join(zones.ZONES[:-1])} or {zones.ZONES[-1]}, or unset for no zone. "
            "Fix: pulumi config set zone 1, or pulumi config rm zone.",
        )
        return None
    if target == "azure" and location and not zones.has_zones(location):
        reader.problems.append(
            f"{PROJECT}:zone = {zone!r} needs a region with availability zones, and azure-native:location = "
            f"{location!r} has none in this project's list (components/zones.py, from {zones.ZONAL_REGIONS_SOURCE} "
            f"as of {zones.ZONAL_REGIONS_AS_OF}). Fix: pulumi config rm zone, or deploy to a zonal region such as "
            "westeurope. If Microsoft's list now shows zones for this region, add it to ZONAL_REGIONS in "
            "components/zones.py, with the page's date."
        )
    return zone


def _data_disk_sku(reader: _Reader, vm_size: str, zone: str | None) -> str:
    premium = sizing.supports_premium_storage(vm_size)
    sku = reader.string("dataDiskSku") or zones.default_data_disk_sku(zone, premium)
    if sku not in DATA_DISK_SKUS:
        reader.problem("dataDiskSku", sku, f"is not a disk SKU. Fix: use one of {', '.join(DATA_DISK_SKUS)}.")
    elif zone and not zones.is_zone_redundant(sku):
        reader.problem(
            "dataDiskSku",
            sku,
            f"is locally redundant, and {PROJECT}:zone = {zone!r} pins the VM to a zone: an LRS disk stays in "
            "one zone and cannot follow the VM to another, so a failover would leave the data behind. "
            f"Fix: pulumi config rm dataDiskSku (a zone defaults to {zones.default_data_disk_sku(zone, premium)}), "
            f"or use {' or '.join(zones.ZONE_REDUNDANT_DISK_SKUS)}, or pulumi config rm zone.",
        )
    elif sku in PREMIUM_DATA_DISK_SKUS and not premium:
        reader.problem(
            "dataDiskSku",
            sku,
            f"needs a VM size with premium storage, and {vm_size} has none. "
            f"Fix: use {zones.default_data_disk_sku(zone, premium_storage=False)}, or a size with an 's' in its "
            "features (e.g. Standard_D2s_v5).",
        )
    return sku


def _data_disk_source_id(reader: _Reader) -> str | None:
    key = "dataDiskSourceId"
    value = reader.string(key)
    if value and not _DISK_SOURCE_ID.match(value):
        reader.problem(
            key,
            value,
            "is not the resource id of a managed disk or a disk snapshot. Fix: pulumi config set dataDiskSourceId "
            "/subscriptions/<id>/resourceGroups/<group>/providers/Microsoft.Compute/snapshots/<name> "
            "(or .../disks/<name>; `az snapshot show --query id` prints it), or pulumi config rm dataDiskSourceId.",
        )
    return value


def _backup_schedule(reader: _Reader) -> tuple[int, int]:
    interval = reader.integer("backupIntervalHours", minimum=1, maximum=24)
    retention = reader.integer("backupRetentionDays", minimum=1, maximum=3650)
    allowed = ", ".join(str(hours) for hours in BACKUP_INTERVALS_HOURS)
    if interval not in BACKUP_INTERVALS_HOURS:
        reader.problem(
            "backupIntervalHours",
            interval,
            f"is not an interval Azure Backup for disks offers. Fix: use one of {allowed}.",
        )
    elif retained_snapshots(interval, retention) > MAX_SCHEDULED_SNAPSHOTS:
        reader.problem(
            "backupRetentionDays",
            retention,
            f"with a backup every {interval} h keeps {retained_snapshots(interval, retention)} snapshots; a disk "
            f"keeps at most {MAX_SCHEDULED_SNAPSHOTS} scheduled ones. Fix: pulumi config set backupRetentionDays "
            f"{MAX_SCHEDULED_SNAPSHOTS * interval // 24}, or a longer backupIntervalHours.",
        )
    return interval, retention


def _admin_username(reader: _Reader) -> str:
    key = "adminUsername"
    name = reader.string(key) or ""
    if not _LINUX_USERNAME.match(name) or name in _RESERVED_USERNAMES:
        reader.problem(
            key,
            name,
            "must be 1-32 lowercase letters, digits, _ or -, start with a letter or _, and not be a name Azure "
            "reserves (admin, root, user, ...). Fix: pulumi config set adminUsername azureuser.",
        )
    return name


def _ssh_key_problem(key_type: str, blob_text: str) -> str | None:
    """Why an OpenSSH public key would be refused (by Azure or sshd), or None when it parses and is strong."""
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        return "its base64 part does not decode"
    fields: list[bytes] = []
    offset = 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            return "its key data is truncated"
        (length,) = struct.unpack(">I", blob[offset : offset + 4])
        fields.append(blob[offset + 4 : offset + 4 + length])
        offset += 4 + length
        if offset > len(blob):
            return "its key data is truncated"
    if not fields or fields[0] != key_type.encode():
        return f"its key data is not a {key_type} key"
    if key_type == "ssh-rsa":
        if len(fields) != 3:
            return "its RSA key data does not parse"
        bits = int.from_bytes(fields[2], "big").bit_length()
        if bits < MIN_RSA_BITS:
            return f"it is a {bits}-bit RSA key, and Azure needs at least {MIN_RSA_BITS} bits"
    elif key_type == "ssh-ed25519":
        if len(fields) != 2 or len(fields[1]) != 32:
            return "its ed25519 key data does not parse"
    else:
        curve = key_type.removeprefix("ecdsa-sha2-")
        if len(fields) != 3 or fields[1] != curve.encode() or len(fields[2]) != _ECDSA_POINT_BYTES[curve]:
            return "its ECDSA key data does not parse"
    return None


def _ssh_public_key(reader: _Reader) -> str | None:
    key = "sshPublicKey"
    value = reader.string(key)
    if not value:
        return None
    fix = 'Fix: pulumi config set sshPublicKey "$(cat ~/.ssh/id_ed25519.pub)".'
    if "PRIVATE KEY" in value or value.startswith("-----"):
        reader.problem(
            key, value, f"is a private key; it must never leave your machine. Give the .pub file. {fix}", "[not shown]"
        )
        return None
    match = _SSH_KEY.match(value)
    shown = repr(value if len(value) <= 60 else f"{value[:40]}...{value[-12:]}")
    if not match:
        reader.problem(key, value, f"is not an OpenSSH public key (ed25519, ecdsa or RSA). {fix}", shown)
        return None
    problem = _ssh_key_problem(match.group(1), match.group(3))
    if problem:
        reader.problem(key, value, f"{problem}. {fix}", shown)
    return value


def _otel_service_name(reader: _Reader) -> str:
    key = "otelServiceName"
    raw = reader.value(key)
    name = reader.string(key) or ""
    if not name or not _PRINTABLE.match(name):
        reader.problem(
            key,
            raw,
            "must be a non-blank name of printable ASCII, or unset for chromadb. "
            "Fix: pulumi config set otelServiceName chroma-prod.",
        )
    return name


def _optional_match(reader: _Reader, key: str, pattern: re.Pattern[str], fix: str) -> str | None:
    value = reader.string(key)
    if value and not pattern.match(value):
        reader.problem(key, value, fix)
    return value or None


def _optional_choice(reader: _Reader, key: str, choices: tuple[str, ...]) -> str | None:
    value = reader.string(key)
    if value and value not in choices:
        reader.problem(key, value, f"must be one of {', '.join(choices)}. Fix: pulumi config set {key} {choices[-1]}.")
    return value


def load_settings(
    raw: Mapping[str, Any],
    location: str | None = None,
    encrypted: frozenset[str] | None = None,
) -> Settings:
    """Validates raw stack config (strings as the CLI delivers them, or parsed values).

    `encrypted` names the keys the stack stores encrypted; None means all of them are.
    """
    reader = _Reader(raw)
    for key in sorted(secret_keys()):
        if raw.get(key) and encrypted is not None and key not in encrypted:
            reader.problem(
                key,
                raw[key],
                f"is stored in plain text in the stack file. Fix: pulumi config set --secret {key} <value>.",
            )
    target = reader.string("target") or ""
    if target not in TARGETS:
        reader.problem("target", target, f"must be one of {', '.join(TARGETS)}. Fix: pulumi config set target azure.")
    auth_header = reader.string("authHeader") or ""
    if auth_header not in AUTH_HEADERS:
        reader.problem(
            "authHeader",
            auth_header,
            f"must be {' or '.join(AUTH_HEADERS)}, the two headers Chroma's client sends. "
            "Fix: pulumi config set authHeader Authorization.",
        )
    vm_size = reader.string("vmSize") or ""
    memory = _vm_memory(reader, vm_size)
    embeddings = reader.integer("expectedEmbeddings", minimum=0)
    dimensions = reader.integer("embeddingDimensions", minimum=1, maximum=65536)
    if target == "azure":
        _check_ram(reader, vm_size, memory, embeddings, dimensions)
        if not location:
            reader.problems.append(
                "azure-native:location is not set: the Azure stack needs a region. "
                "Fix: pulumi config set azure-native:location eastus."
            )
    zone = _zone(reader, target, location)
    backup_interval_hours, backup_retention_days = _backup_schedule(reader)
    allowed_cidrs = _cidrs(reader, "allowedCidrs")
    if not allowed_cidrs and not reader.problems:
        reader.problem(
            "allowedCidrs",
            [],
            "is empty, so no one could reach the endpoint. Fix: list the ranges allowed in, or 0.0.0.0/0 for anyone.",
        )
    settings = Settings(
        target=target,
        chroma_version=_chroma_version(reader),
        auth_header=auth_header,
        auth_token=_auth_token(reader),
        otel_endpoint=_otel_endpoint(reader),
        otel_service_name=_otel_service_name(reader),
        otel_headers=_otel_headers(reader),
        otel_granularity=_optional_choice(reader, "otelGranularity", GRANULARITIES),
        vm_size=vm_size,
        vm_memory_gib=memory,
        expected_embeddings=embeddings,
        embedding_dimensions=dimensions,
        data_disk_size_gb=reader.integer("dataDiskSizeGb", minimum=4, maximum=32767),
        data_disk_sku=_data_disk_sku(reader, vm_size, zone),
        zone=zone,
        data_disk_source_id=_data_disk_source_id(reader),
        backup_enabled=reader.boolean("backupEnabled"),
        backup_interval_hours=backup_interval_hours,
        backup_retention_days=backup_retention_days,
        protect_data_disk=reader.boolean("protectDataDisk"),
        admin_username=_admin_username(reader),
        ssh_public_key=_ssh_public_key(reader),
        ssh_allowed_cidrs=_cidrs(reader, "sshAllowedCidrs"),
        allowed_cidrs=allowed_cidrs,
        dns_label=_optional_match(
            reader,
            "dnsLabel",
            _DNS_LABEL,
            "breaks Azure's DNS label rule: 3-63 lowercase letters, digits and hyphens, starting with a letter "
            "and not ending with a hyphen. Fix: pulumi config set dnsLabel my-chroma.",
        ),
        acme_email=_optional_match(
            reader, "acmeEmail", _EMAIL, "is not an email address. Fix: pulumi config set acmeEmail ops@example.com."
        ),
        host_port=reader.integer("hostPort", minimum=1, maximum=65535),
        location=location,
    )
    if target == "azure":
        _check_data_disk(reader, settings.data_disk_size_gb, embeddings, dimensions)
    if reader.problems:
        raise SettingsError(reader.problems)
    return settings


def load_stack_settings() -> Settings:
    """Settings from the running stack's config; undeclared keys (typos) are reported too."""
    namespace = f"{PROJECT}:"
    runtime_config = pulumi.runtime.config
    # The language host passes config both ways (set_all_config and the environment); read both.
    full_keys = set(runtime_config.CONFIG.get()) | set(runtime_config.get_config_env())
    secret_full_keys = set(runtime_config.get_config_secret_keys_env())
    keys = set(declarations()) | {key.removeprefix(namespace) for key in full_keys if key.startswith(namespace)}
    config = pulumi.Config()
    raw = {key: config.get(key) for key in keys}
    encrypted = frozenset(
        key for key in keys if pulumi.runtime.is_config_secret(namespace + key) or namespace + key in secret_full_keys
    )
    return load_settings(raw, location=pulumi.Config("azure-native").get("location"), encrypted=encrypted)
