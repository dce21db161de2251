"""What runs beside Chroma, rendered once for every target.

The proxy config, Chroma's environment, the images and the health checks come from here, so a
change to token rules or to OpenTelemetry happens in one place. Targets differ only through the
parameters of `ProxySite` (site address, TLS mode, upstream).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "cloud-init"

CHROMA_PORT = 8000
PROXY_HEALTH_PORT = 2020
# The VM's proxy takes `caddy reload` here (inside its container); the local stack has no admin API.
PROXY_ADMIN_SOCKET = "/run/caddy-admin.sock"
# Inside the proxy's container, beside the Caddyfile: the token, which Caddy reads at every request,
# so that replacing this file rotates the token without a reload. Root only; Caddy's image runs as root.
PROXY_TOKEN_FILE = "/etc/caddy/token"  # noqa: S105 - a path, not a secret
HEARTBEAT_PATH = "/api/v2/heartbeat"
CADDY_IMAGE = "caddy:2.10.2"
CHROMA_IMAGE_REPOSITORY = "chromadb/chroma"
# The guard runs scripts/chroma_data.py (standard library only) beside Chroma, whose image has no Python.
GUARD_IMAGE = "python:3.12-slim-bookworm"

# Crash safety (scripts/chroma_data.py, cloud-init/chroma-start.sh). Chroma's data directory in its
# container, and where the start script and the data tool are mounted or uploaded.
CHROMA_DATA_PATH = "/data"
START_SCRIPT_PATH = "/usr/local/bin/chroma-start.sh"
DATA_TOOL_PATH = "/usr/local/bin/chroma_data.py"
SCRIPTS_DIR = TEMPLATE_DIR.parent / "scripts"
# Every start goes through chroma-start.sh, which waits for the guard's check; dumb-init (in the
# image) forwards SIGTERM as the image's own entrypoint does.
CHROMA_ENTRYPOINT = ("dumb-init", "--", "bash", START_SCRIPT_PATH)
CHROMA_COMMAND = ("chroma", "run", "/config.yaml")
# Chroma listens on loopback only, inside the proxy's network namespace: the proxy is the one way in,
# and the guard, which shares that namespace, reaches Chroma there.
CHROMA_LISTEN_ADDRESS = "127.0.0.1"
GUARD_COMMAND = (
    "python3",
    DATA_TOOL_PATH,
    "guard",
    CHROMA_DATA_PATH,
    "--endpoint",
    f"http://{CHROMA_LISTEN_ADDRESS}:{CHROMA_PORT}",
)
# SIGKILL is what breaks Chroma's indexes. It exits within a second of SIGTERM (measured 0.3 s on
# 1.5.9), so this grace is never reached; after it, Docker would SIGKILL.
CHROMA_STOP_SIGNAL = "SIGTERM"
CHROMA_STOP_GRACE_SECONDS = 60
# Under memory pressure the kernel's OOM killer picks other processes first (-1000 would exempt
# Chroma entirely and leave the kernel nothing to free when Chroma itself is the leak).
CHROMA_OOM_SCORE_ADJ = -900

AUTHORIZATION = "Authorization"
X_CHROMA_TOKEN = "X-Chroma-Token"  # noqa: S105 - a header name, not a secret
AUTH_HEADERS = (AUTHORIZATION, X_CHROMA_TOKEN)
# RFC 6750 token68: what may follow "Bearer " without quoting, and all a token may hold.
TOKEN68 = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
# The same shape as RE2 in the Caddyfile, without backslashes (which its quoting would have to carry).
TOKEN68_CAPTURE = "([-A-Za-z0-9._~+/]+=*)"
# Where the token file may live: a plain absolute path, safe inside a Caddyfile placeholder.
TOKEN_FILE_PATH = re.compile(r"^(/[A-Za-z0-9._-]+)+$")

# The Chroma image has bash but no curl: speak HTTP over bash's /dev/tcp and want a 200. Healthy
# also needs the guard's ready file: the proxy (which waits for healthy) opens only after the
# write log is kept and any rebuild is done. CHROMA_DATA_DIR is unset in the container.
READY_FILE = ".ready"
CHROMA_HEALTHCHECK = (
    "CMD",
    "bash",
    "-c",
    f"exec 3<>/dev/tcp/127.0.0.1/{CHROMA_PORT}"
    f" && printf 'GET {HEARTBEAT_PATH} HTTP/1.0\\r\\n\\r\\n' >&3"
    " && read -r status <&3 && [[ $status == *' 200 '* ]]"
    f" && [[ -f ${{CHROMA_DATA_DIR:-{CHROMA_DATA_PATH}}}/{READY_FILE} ]]",
)
# Caddy's image is Alpine-based: busybox wget is there.
PROXY_HEALTHCHECK = ("CMD", "wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{PROXY_HEALTH_PORT}/healthz")
HEALTHCHECK_INTERVAL_SECONDS = 10
HEALTHCHECK_TIMEOUT_SECONDS = 5
HEALTHCHECK_RETRIES = 6
HEALTHCHECK_START_PERIOD_SECONDS = 30
# Probe this often until the first success (engines from Docker 25 on; older ones ignore it), so a
# start is seen as healthy within a second or two, not after one whole interval.
HEALTHCHECK_START_INTERVAL_SECONDS = 1
# Docker's json-file driver keeps every line forever by default; a chatty failure (OTel collector
# down, a crash loop) would fill the OS disk. Each container keeps at most LOG_MAX_FILES x LOG_MAX_SIZE.
LOG_DRIVER = "json-file"
LOG_MAX_SIZE = "10m"
LOG_MAX_FILES = 3
LOG_OPTIONS = {"max-size": LOG_MAX_SIZE, "max-file": str(LOG_MAX_FILES)}

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,  # noqa: S701 - renders a Caddyfile, not HTML
)


@dataclass(frozen=True)
class ProxySite:
    """Where the proxy listens and how it does TLS: the only things targets (and tests) change.

    The ports and bind address are for running on loopback, where 80 and 443 are not ours. With
    `admin_socket`, Caddy takes `caddy reload` on that unix socket; without it, its admin API is off.
    `token_file` is where Caddy reads the token, as its own process sees the filesystem.
    """

    site_address: str
    # Chroma shares the proxy's network namespace, so it is on the proxy's loopback.
    upstream: str = f"{CHROMA_LISTEN_ADDRESS}:{CHROMA_PORT}"
    tls_internal: bool = False
    http_port: int | None = None
    https_port: int | None = None
    bind_address: str | None = None
    health_port: int = PROXY_HEALTH_PORT
    admin_socket: str | None = None
    token_file: str = PROXY_TOKEN_FILE


# The crates Chroma 1.5's tracing filter lists, each at trace by default
# (rust/tracing/src/init_tracer.rs). A filter given for one of them replaces its level.
CHROMA_TRACING_CRATES = [
    "chroma_blockstore",
    "chroma_config",
    "chroma_cache",
    "chroma_distance",
    "chroma_error",
    "chroma_fault",
    "chroma_frontend",
    "chroma_index",
    "chroma_log",
    "chroma_log_service",
    "chroma_memberlist",
    "chroma_metering",
    "chroma_metering_macros",
    "chroma_segment",
    "chroma_sqlite",
    "chroma_storage",
    "chroma_sysdb",
    "chroma_system",
    "chroma_test",
    "chroma_tracing",
    "chroma_types",
    "compaction_service",
    "distance_metrics",
    "full_text",
    "metadata_filtering",
    "query_service",
    "s3heap",
    "s3heap_service",
    "wal3",
    "worker",
]
# The per-request span ("POST /api/v2/...") comes from chroma_tracing at DEBUG.
REQUEST_SPAN_CRATE = "chroma_tracing"
# Chroma 0.x granularities, as 1.x filter levels for every other crate. "all" is Chroma's
# default (no filters); "none" means no OpenTelemetry at all.
GRANULARITY_LEVELS = {"operation": "error", "operation_and_segment": "info", "all": None}
GRANULARITIES = ("none", *GRANULARITY_LEVELS)
# Spans are batched; Chroma does not flush on shutdown, so export every second, not every five.
OTEL_BATCH_DELAY_MS = "1000"


@dataclass(frozen=True)
class OtelSettings:
    """OpenTelemetry export as Chroma 1.x honours it."""

    endpoint: str
    service_name: str
    headers: str | None = None
    granularity: str | None = None


def chroma_image(chroma_version: str) -> str:
    """The pinned Chroma image for a version tag."""
    return f"{CHROMA_IMAGE_REPOSITORY}:{chroma_version}"


def auth_value(auth_header: str, token: str) -> str:
    """The exact header value a client sends: `Bearer T` for Authorization, else the token."""
    return f"Bearer {token}" if auth_header == AUTHORIZATION else token


def auth_pattern(auth_header: str) -> str:
    """The RE2 pattern the proxy matches the auth header against, capturing the token it carries.

    Any case of `Bearer` for Authorization; a token68 token, which the capture holds (never empty).
    """
    return f"^(?i:bearer) +{TOKEN68_CAPTURE}$" if auth_header == AUTHORIZATION else f"^{TOKEN68_CAPTURE}$"


def checked_token(token: str) -> str:
    """The token, once it is known to be one the proxy can compare: non-empty RFC 6750 token68."""
    if not token:
        raise ValueError("an empty token would let every request through")
    if not TOKEN68.match(token):
        raise ValueError("the token must be RFC 6750 token68 (letters, digits, -._~+/ and trailing =)")
    return token


def token_file_content(token: str) -> str:
    """The token file's bytes, as chroma-apply writes them too: the token and a newline (Caddy trims it)."""
    return checked_token(token) + "\n"


def render_caddyfile(site: ProxySite, auth_header: str, acme_email: str | None = None) -> str:
    """The proxy config: TLS, the open heartbeat, the token check against the token file, 401 for the rest.

    It holds no secret: the token lives in `site.token_file` (see `token_file_content`).
    """
    if auth_header not in AUTH_HEADERS:
        raise ValueError(f"auth_header must be one of {AUTH_HEADERS}, not {auth_header!r}")
    if not TOKEN_FILE_PATH.match(site.token_file):
        raise ValueError(f"token_file must be an absolute path of letters, digits and ._-, not {site.token_file!r}")
    challenge = 'Bearer realm="chroma"' if auth_header == AUTHORIZATION else "Token"
    return _TEMPLATES.get_template("Caddyfile.j2").render(
        site=site,
        acme_email=acme_email,
        heartbeat_path=HEARTBEAT_PATH,
        auth_header=auth_header,
        auth_headers=AUTH_HEADERS,
        auth_pattern=auth_pattern(auth_header),
        challenge=challenge.replace('"', '\\"'),
    )


def chroma_env(otel: OtelSettings | None) -> dict[str, str]:
    """Chroma's environment: loopback only, and OTel only with an endpoint (an empty one makes Chroma panic)."""
    # Chroma 1.x reads `listen_address` (default 0.0.0.0) from its config file, overridden by CHROMA_*.
    env = {"CHROMA_LISTEN_ADDRESS": CHROMA_LISTEN_ADDRESS}
    if otel is None or not otel.endpoint:
        return env
    env |= {
        "CHROMA_OPEN_TELEMETRY__ENDPOINT": otel.endpoint,
        "CHROMA_OPEN_TELEMETRY__SERVICE_NAME": otel.service_name,
    }
    if otel.headers:
        env["OTEL_EXPORTER_OTLP_HEADERS"] = otel.headers
    level = GRANULARITY_LEVELS.get(otel.granularity or "all")
    if level:
        env["CHROMA_OPEN_TELEMETRY__FILTERS"] = otel_filters(level)
    env["OTEL_BSP_SCHEDULE_DELAY"] = OTEL_BATCH_DELAY_MS
    return env


def otel_filters(level: str) -> str:
    """Chroma's `open_telemetry.filters` in the env syntax its config loader (figment) parses."""
    filters = [
        f"{{crate_name={crate},filter_level={'debug' if crate == REQUEST_SPAN_CRATE else level}}}"
        for crate in CHROMA_TRACING_CRATES
    ]
    return "[" + ",".join(filters) + "]"
