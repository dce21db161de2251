"""Smoke test for a deployed Chroma: is it reachable, is its TLS valid, is it locked, does it serve data, how fast.

Run it after every deploy, by hand or in CI:

    python scripts/smoke_test.py --stack dev
    CHROMA_ENDPOINT=https://host CHROMA_TOKEN=... python scripts/smoke_test.py --json

The checks run in order and stop at the first failure (the rest show as skipped): each depends
on the one before it, and a deployment that answers without a token gets no data written to it.
Exit codes: 0 every check passed, 1 a check failed (the output names it), 2 usage or configuration.
Results go to stdout; progress while waiting for a booting VM goes to stderr, so `--json` stdout is
pure JSON. The token is never printed, in any quoted or escaped form; a token that cannot be sent
in an HTTP header (a line end, a control character, non-ASCII) is refused, exit 2, before any
request. Every request has a timeout (--timeout), the client's construction included, so a
server that stops answering fails a check instead of hanging CI. The data check runs with both
of chromadb's clients, sync and async, each sending the token as a header.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import random
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
# Run as `python scripts/smoke_test.py`, sys.path starts at scripts/; the header rules live in the project.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from components.runtime import AUTH_HEADERS, AUTHORIZATION, HEARTBEAT_PATH, auth_value  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
CHECKS = ("reachable", "tls", "locked", "data", "latency")

DEFAULT_WAIT_SECONDS = 600.0
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 15.0
REQUEST_TIMEOUT_SECONDS = 15.0
# chromadb's client constructor makes a few requests of its own: this many request timeouts in all.
CONNECT_TIMEOUTS = 3
PULUMI_TIMEOUT_SECONDS = 120

# A data route of Chroma's (list collections): it must refuse requests without the right token.
LOCKED_PROBE_PATH = "/api/v2/tenants/default_tenant/databases/default_database/collections?limit=1"

# Deterministic data: Gaussian vectors from a fixed seed, probed with slightly moved copies of some.
VECTOR_SEED = 5
VECTOR_COUNT = 300
VECTOR_DIMENSIONS = 32
PROBE_COUNT = 10
PROBE_NOISE = 0.01
LATENCY_VECTOR_COUNT = 100
LATENCY_QUERIES = 20
LATENCY_RESULTS = 5
COLLECTION_PREFIX = "smoke-test-"
# What a header value may hold here: visible ASCII. The proxy's token is RFC 6750 token68, a subset.
HEADER_SAFE = frozenset(chr(code) for code in range(0x21, 0x7F))
# Pieces of a token shorter than this are not redacted on their own (they would blank ordinary words).
MIN_REDACTED_PIECE = 4

T = TypeVar("T")


class UsageError(Exception):
    """Bad arguments or stack exports: exit 2, with a message that says how to fix it."""


class CheckError(Exception):
    """A check found the deployment wanting; the message is the check's detail line."""


@dataclass(frozen=True)
class Target:
    """The deployment under test, from the command line, the environment or a stack's exports."""

    scheme: str
    host: str
    port: int
    token: str
    auth_header: str
    ca_cert: Path | None
    source: str

    @property
    def endpoint(self) -> str:
        """scheme://host[:port], the URL the checks talk to (no token in it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.scheme == "https" else 80
        return f"{self.scheme}://{host}" + ("" if self.port == default_port else f":{self.port}")

    @property
    def credentials_hint(self) -> str:
        """Where the token and header came from, to say what to fix when they are refused."""
        if self.source.startswith("stack "):
            return f"the {self.source} exports authToken and authHeader"
        return "--token (or CHROMA_TOKEN) and --auth-header (or CHROMA_AUTH_HEADER)"

    @property
    def auth(self) -> dict[str, str]:
        """The header that carries the token, as the proxy expects it."""
        return {self.auth_header: auth_value(self.auth_header, self.token)}


@dataclass
class CheckResult:
    """One check's outcome. `ok` is None for a check that did not run."""

    name: str
    ok: bool | None
    seconds: float
    detail: str


class Report:
    """Writes results (stdout) and progress (stderr), with the token blanked out of every line."""

    def __init__(self, json_enabled: bool) -> None:
        self.json_enabled = json_enabled
        self._secrets: list[str] = []

    def hide(self, *values: str) -> None:
        """Never prints these values, in any form an error message may quote them in."""
        for value in values:
            self._secrets.extend(form for form in quoted_forms(value) if form)

    def redact(self, text: str) -> str:
        """The text with every hidden value replaced by ***."""
        for value in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(value, "***")
        return text

    def line(self, text: str) -> None:
        """A result line for people (not in --json mode)."""
        if not self.json_enabled:
            print(self.redact(text), flush=True)

    def progress(self, text: str) -> None:
        """A progress line, on stderr in every mode."""
        print(self.redact(text), file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        """A usage or configuration error, on stderr, and as JSON in --json mode."""
        print(f"smoke_test: error: {self.redact(message)}", file=sys.stderr, flush=True)
        if self.json_enabled:
            print(json.dumps({"ok": False, "error": self.redact(message), "checks": []}), flush=True)


def quoted_forms(value: str) -> set[str]:
    """`value` as it is, as Python, JSON, URLs and bytes reprs escape it, and each line or word of it."""
    if not value:
        return set()
    forms = {
        value,
        repr(value)[1:-1],
        ascii(value)[1:-1],
        json.dumps(value)[1:-1],
        value.encode("unicode_escape").decode("ascii"),
        repr(value.encode("utf-8", "backslashreplace"))[2:-1],
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
    }
    # An error may quote only the part before a line end, or a header split at whitespace.
    pieces = {piece for piece in "".join(c if c in HEADER_SAFE else "\n" for c in value).split("\n")}
    forms |= {piece for piece in pieces if len(piece) >= MIN_REDACTED_PIECE}
    return forms


def header_problem(token: str) -> str | None:
    """Why `token` cannot go in an HTTP header, without quoting any of it; None when it can."""
    names = {"\r": "a carriage return (CR)", "\n": "a line feed (LF)", "\t": "a tab", " ": "a space"}
    for position, char in enumerate(token, start=1):
        if char in HEADER_SAFE:
            continue
        if ord(char) > 0x7E and ord(char) != 0x7F:
            what = "a character that is not ASCII"
        else:
            what = names.get(char, f"the control character 0x{ord(char):02x}")
        return (
            f"the token holds {what} at position {position} of {len(token)}, so it cannot be sent in an HTTP "
            "header. Fix: give the token alone, without line ends or spaces (a token copied from a file saved "
            "with Windows line ends ends in CR LF)"
        )
    return None


def format_line(name: str, status: str, seconds: float, detail: str) -> str:
    """One aligned result line: `  reachable   ok     0.4s  heartbeat 200 after 1 try`."""
    return f"  {name:<12}{status:<5}{seconds:>5.1f}s  {detail}"


# ---------------------------------------------------------------------------------------------
# Arguments, environment and stack exports


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="smoke_test.py",
        description="Prove a Chroma deployment is reachable, has valid TLS, refuses requests without "
        "the token, serves data, and report its query latency.",
        epilog="Exit codes: 0 all checks passed, 1 a check failed, 2 usage or configuration error. "
        "Prefer CHROMA_TOKEN to --token: a command line is visible to other users of the machine.",
    )
    parser.add_argument(
        "--stack",
        metavar="NAME",
        help="read endpoint, authHeader and authToken from this stack's outputs (needs the pulumi CLI)",
    )
    parser.add_argument("--endpoint", metavar="URL", help="https://host[:port] (default: $CHROMA_ENDPOINT)")
    parser.add_argument("--token", metavar="TOKEN", help="the token clients send (default: $CHROMA_TOKEN)")
    parser.add_argument(
        "--auth-header",
        choices=AUTH_HEADERS,
        help=f"header that carries the token (default: $CHROMA_AUTH_HEADER or {AUTHORIZATION})",
    )
    parser.add_argument("--ca-cert", metavar="FILE", type=Path, help="trust this CA (PEM) instead of the system's")
    parser.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_non_negative_seconds,
        default=DEFAULT_WAIT_SECONDS,
        help=f"how long to wait for the heartbeat, e.g. while a VM boots (default {DEFAULT_WAIT_SECONDS:.0f})",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_number,
        default=REQUEST_TIMEOUT_SECONDS,
        help=f"give up on any one request after this long (default {REQUEST_TIMEOUT_SECONDS:.0f}; "
        f"connecting the Chroma client may take {CONNECT_TIMEOUTS} times this)",
    )
    parser.add_argument(
        "--max-p95-ms", metavar="MS", type=_positive_number, help="fail the latency check above this p95"
    )
    parser.add_argument(
        "--resolve",
        metavar="HOST:IP",
        type=_host_and_address,
        help="connect to IP wherever HOST is looked up, keeping HOST for TLS (e.g. a VM behind a port forward)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout, for CI")
    return parser


def _host_and_address(text: str) -> tuple[str, str]:
    host, _, address = text.rpartition(":") if text.count(":") == 1 else text.partition(":")
    if not host or not address:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:IP, e.g. chroma.example.com:127.0.0.1")
    return host, address


@contextlib.contextmanager
def resolved(host: str, address: str) -> Iterator[None]:
    """Within the block, every lookup of `host` (urllib, sockets, Chroma's client) returns `address`."""
    original = socket.getaddrinfo

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        # The async client (anyio) looks names up as IDNA-encoded bytes.
        wanted = name.decode("idna") if isinstance(name, bytes) else name
        return original(address if wanted == host else name, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    try:
        yield
    finally:
        socket.getaddrinfo = original


def _non_negative_seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, not {text!r}")
    return value


def _positive_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text!r}")
    return value


def resolve_target(args: argparse.Namespace, environ: dict[str, str]) -> Target:
    """The deployment to test: from --stack's exports, or from flags falling back to CHROMA_* variables."""
    if args.stack:
        given = [flag for flag, value in (("--endpoint", args.endpoint), ("--token", args.token)) if value]
        given += ["--auth-header"] if args.auth_header else []
        if given:
            raise UsageError(f"--stack reads the endpoint and token from the stack; drop {', '.join(given)}")
        exports = stack_exports(args.stack)
        missing = [key for key in ("endpoint", "authToken") if not exports.get(key)]
        if missing:
            raise UsageError(
                f"stack {args.stack!r} has no {' or '.join(missing)} export: "
                f"run `pulumi up --stack {args.stack}` first, or pass --endpoint and --token"
            )
        endpoint, token = str(exports["endpoint"]), str(exports["authToken"])
        auth_header = str(exports.get("authHeader") or AUTHORIZATION)
        source = f"stack {args.stack}"
    else:
        endpoint = args.endpoint or environ.get("CHROMA_ENDPOINT", "")
        token = args.token or environ.get("CHROMA_TOKEN", "")
        auth_header = args.auth_header or environ.get("CHROMA_AUTH_HEADER") or AUTHORIZATION
        if not endpoint:
            raise UsageError("no endpoint: pass --stack NAME, or --endpoint URL (or set CHROMA_ENDPOINT)")
        if not token:
            raise UsageError("no token: pass --token TOKEN or set CHROMA_TOKEN (or use --stack NAME)")
        source = "--endpoint" if args.endpoint else "CHROMA_ENDPOINT"
    if auth_header not in AUTH_HEADERS:
        raise UsageError(f"the auth header must be one of {', '.join(AUTH_HEADERS)}, not {auth_header!r}")
    problem = header_problem(token)
    if problem:
        raise UsageError(problem)
    scheme, host, port = parse_endpoint(endpoint)
    ca_cert = args.ca_cert
    if ca_cert is not None:
        if not ca_cert.is_file():
            raise UsageError(f"--ca-cert {ca_cert}: no such file")
        try:
            ssl.create_default_context(cafile=str(ca_cert))
        except ssl.SSLError as error:
            raise UsageError(f"--ca-cert {ca_cert}: not a PEM CA certificate ({error})") from error
    return Target(scheme, host, port, token, auth_header, ca_cert, source)


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """Scheme, host and port of an endpoint URL such as https://chroma.example.com."""
    parsed = urllib.parse.urlsplit(endpoint.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"the endpoint must look like https://host[:port], not {endpoint!r}")
    if parsed.username or parsed.password:
        raise UsageError("the endpoint must not carry credentials (user:password@): pass the token with --token")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise UsageError(f"the endpoint must be scheme://host[:port] with nothing after it, not {endpoint!r}")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as error:
        raise UsageError(f"the endpoint's port is not valid: {endpoint!r}") from error
    return parsed.scheme, parsed.hostname, port


def stack_exports(stack: str) -> dict[str, Any]:
    """`pulumi stack output --json --show-secrets` for a stack of this project."""
    pulumi = shutil.which("pulumi")
    if pulumi is None:
        raise UsageError(
            "--stack needs the pulumi CLI, which is not on PATH: install it "
            "(https://www.pulumi.com/docs/install/), or pass --endpoint and --token "
            "(or set CHROMA_ENDPOINT and CHROMA_TOKEN) instead of --stack"
        )
    command = [pulumi, "stack", "output", "--json", "--show-secrets", "--stack", stack]
    try:
        # The pulumi CLI found on PATH, with a fixed argument list: reading exports is its job.
        finished = subprocess.run(  # noqa: S603
            command, cwd=ROOT, capture_output=True, text=True, timeout=PULUMI_TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise UsageError(f"`pulumi stack output` did not answer within {PULUMI_TIMEOUT_SECONDS}s") from error
    if finished.returncode != 0:
        reason = (finished.stderr.strip() or finished.stdout.strip() or "no message").splitlines()[-1]
        raise UsageError(f"`pulumi stack output --stack {stack}` failed (exit {finished.returncode}): {reason}")
    try:
        exports = json.loads(finished.stdout)
    except json.JSONDecodeError as error:
        raise UsageError(f"`pulumi stack output --json --stack {stack}` printed no JSON: {error}") from error
    if not isinstance(exports, dict):
        raise UsageError(
            f"`pulumi stack output --json --stack {stack}` printed {type(exports).__name__}, not an object"
        )
    return exports


# ---------------------------------------------------------------------------------------------
# Raw HTTP and TLS


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Shows redirects instead of following them: an http endpoint answered by a redirect is a finding."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def http_get(
    url: str, headers: dict[str, str], context: ssl.SSLContext | None, timeout: float
) -> tuple[int, dict[str, str]]:
    """Status code and headers of a GET, without following redirects."""
    opener = urllib.request.build_opener(_NoRedirect(), urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - parse_endpoint allows only http(s)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers or {})


def describe(error: BaseException) -> str:
    """A short reason for a failed request: `connection refused`, not a traceback."""
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, BaseException):
        error = error.reason
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {error.verify_message}"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]  # "connection refused", to read on in a line
    return str(error) or type(error).__name__


def tls_context(ca_cert: Path | None) -> ssl.SSLContext:
    """Verifying TLS: the system's CAs, or only the given CA."""
    return ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)


def unverified_tls_context() -> ssl.SSLContext:
    """For the heartbeat only, which carries no token: whether the endpoint answers comes before whether to trust it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------------------------------------
# The checks. Each returns its detail line or raises CheckError.


@dataclass
class Context:
    """What the checks share: the target, the report, options, and the Chroma client once open."""

    target: Target
    report: Report
    wait_seconds: float
    max_p95_ms: float | None
    timeout: float = REQUEST_TIMEOUT_SECONDS
    client: Any = None


def check_reachable(context: Context) -> str:
    """GET the heartbeat (no token) until it answers 200, with backoff, for up to --wait seconds."""
    url = context.target.endpoint + HEARTBEAT_PATH
    tls = unverified_tls_context()
    start = time.monotonic()
    deadline = start + context.wait_seconds
    delay = FIRST_RETRY_SECONDS
    attempt = 0
    while True:
        attempt += 1
        timeout = max(1.0, min(context.timeout, deadline - time.monotonic()))
        try:
            status, headers = http_get(url, {}, tls, timeout)
        except (OSError, http.client.HTTPException) as error:
            last_error = describe(error)
        else:
            if status == 200:
                return f"heartbeat 200 after {attempt} {'try' if attempt == 1 else 'tries'}"
            if status in (301, 302, 307, 308):
                raise CheckError(f"heartbeat redirects to {headers.get('Location')}: use that endpoint")
            if status in (401, 403):
                raise CheckError(f"heartbeat answered {status}: the proxy must leave {HEARTBEAT_PATH} open")
            last_error = f"heartbeat answered {status}"
        elapsed = time.monotonic() - start
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tries = f"{attempt} {'try' if attempt == 1 else 'tries'}"
            raise CheckError(f"no heartbeat within {context.wait_seconds:g}s ({tries}); last error: {last_error}")
        pause = min(delay, remaining)
        context.report.progress(
            format_line("reachable", "wait", elapsed, f"try {attempt}: {last_error}; next try in {pause:.1f}s")
        )
        time.sleep(pause)
        delay = min(delay * 2, MAX_RETRY_SECONDS)


def check_tls(context: Context) -> str:
    """For https: the certificate chains to a trusted CA, names the host, and how long it has left."""
    target = context.target
    if target.scheme != "https":
        return "not checked: http endpoint, so the token travels unencrypted"
    try:
        with (
            socket.create_connection((target.host, target.port), timeout=context.timeout) as raw,
            tls_context(target.ca_cert).wrap_socket(raw, server_hostname=target.host) as tls,
        ):
            certificate = tls.getpeercert()
    except ssl.SSLCertVerificationError as error:
        trusted_by = (
            f"the CA in {target.ca_cert}" if target.ca_cert else "this system's CAs (a private CA needs --ca-cert)"
        )
        raise CheckError(
            f"certificate not valid for {target.host}: {error.verify_message}; trusted: {trusted_by}"
        ) from error
    except OSError as error:
        raise CheckError(f"TLS handshake with {target.host}:{target.port} failed: {describe(error)}") from error
    expires_at = ssl.cert_time_to_seconds(certificate["notAfter"])
    days_left = (expires_at - time.time()) / 86400
    expiry = datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    issuer = dict(item[0] for item in certificate.get("issuer", ()))
    issued_by = issuer.get("organizationName") or issuer.get("commonName") or "unknown issuer"
    return f"valid for {target.host}, expires in {days_left:.1f} days ({expiry}), issued by {issued_by}"


def check_locked(context: Context) -> str:
    """A data route refuses no token and a wrong token (401/403), and accepts the right one."""
    target = context.target
    url = target.endpoint + LOCKED_PROBE_PATH
    tls = tls_context(target.ca_cert) if target.scheme == "https" else None
    wrong_token = secrets.token_urlsafe(30)
    attempts = {
        "no token": {},
        "wrong token": {target.auth_header: auth_value(target.auth_header, wrong_token)},
        "token": target.auth,
    }
    statuses: dict[str, int] = {}
    for label, headers in attempts.items():
        try:
            statuses[label], _ = http_get(url, headers, tls, context.timeout)
        except (OSError, http.client.HTTPException) as error:
            raise CheckError(f"request with {label} failed: {describe(error)}") from error
    probe = LOCKED_PROBE_PATH.split("?")[0]
    for label in ("no token", "wrong token"):
        status = statuses[label]
        if 200 <= status < 300:
            raise CheckError(f"serves data with {label}: GET {probe} answered {status}, not 401 or 403")
        if status not in (401, 403):
            raise CheckError(f"a request with {label} got {status}, not 401 or 403")
    if statuses["token"] != 200:
        raise CheckError(
            f"the token was rejected too ({statuses['token']} with it in {target.auth_header}): "
            f"check {target.credentials_hint}"
        )
    return (
        f"no token {statuses['no token']}, wrong token {statuses['wrong token']}, "
        f"token {statuses['token']} ({target.auth_header})"
    )


def reference_vectors(count: int = VECTOR_COUNT, dimensions: int = VECTOR_DIMENSIONS) -> list[list[float]]:
    """The same `count` vectors on every run, from a fixed seed."""
    generator = random.Random(VECTOR_SEED)  # noqa: S311 - test data, not cryptography
    return [[generator.gauss(0.0, 1.0) for _ in range(dimensions)] for _ in range(count)]


def neighbour_probes(vectors: Sequence[Sequence[float]]) -> list[tuple[str, list[float]]]:
    """(expected id, query): copies of evenly spread stored vectors, each moved slightly."""
    generator = random.Random(VECTOR_SEED + 1)  # noqa: S311 - test data, not cryptography
    step = max(1, len(vectors) // PROBE_COUNT)
    return [
        (vector_id(index), [value + generator.gauss(0.0, PROBE_NOISE) for value in vectors[index]])
        for index in range(0, len(vectors), step)[:PROBE_COUNT]
    ]


def vector_id(index: int) -> str:
    """The id a reference vector is stored under."""
    return f"v{index:04d}"


def within(seconds: float, what: str, call: Callable[[], T]) -> T:
    """`call()`, or CheckError once it has run `seconds`: for calls whose own timeout cannot be set.

    The call goes on in a daemon thread, which ends with the process.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed back to the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, name=what, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise CheckError(f"{what}: no answer within {seconds:g}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def client_settings(target: Target) -> Any:
    """Settings for chromadb's clients: no telemetry, and TLS verified against the given CA or the system's.

    The async client skips verification unless chroma_server_ssl_verify is set, so it always is.
    """
    from chromadb.config import Settings

    return Settings(
        anonymized_telemetry=False,
        chroma_server_ssl_verify=str(target.ca_cert) if target.ca_cert else True,
    )


def open_client(target: Target, timeout: float = REQUEST_TIMEOUT_SECONDS) -> Any:
    """Chroma's own Python client (HttpClient) with the token, the CA, no telemetry, and a timeout on every request."""
    import chromadb  # A second to import: only the checks that talk to Chroma pay for it.
    import httpx

    def construct() -> Any:
        with warnings.catch_warnings():
            # chromadb passes the CA path on as httpx's `verify=<str>`, which httpx 0.28 deprecates.
            warnings.filterwarnings("ignore", message="`verify=<str>` is deprecated", category=DeprecationWarning)
            return chromadb.HttpClient(
                host=target.host,
                port=target.port,
                ssl=target.scheme == "https",
                headers=target.auth,
                settings=client_settings(target),
            )

    # The constructor already makes requests, before any timeout can be set on its session.
    client = within(CONNECT_TIMEOUTS * timeout, "connect", construct)
    # chromadb 1.5.9 builds its httpx.Client with timeout=None; a stuck server must not hang CI forever.
    session = getattr(getattr(client, "_server", None), "_session", None)
    if isinstance(session, httpx.Client):
        session.timeout = httpx.Timeout(timeout)
    return client


@dataclass
class Step:
    """The step a check is on, so a failure says where it happened."""

    name: str


def in_temporary_collection(client: Any, work: Callable[[Any, Step], str]) -> str:
    """`work(collection, step)` in a new collection with a unique name, deleted afterwards whatever happened."""
    name = f"{COLLECTION_PREFIX}{uuid.uuid4().hex[:16]}"
    step = Step("create collection")
    failure: str | None = None
    try:
        collection = client.create_collection(
            name,
            embedding_function=None,  # vectors are given; the default function would fetch a model
            metadata={"created_by": "scripts/smoke_test.py"},  # to recognise one left by a killed run
        )
        detail = work(collection, step)
    except CheckError as error:
        failure = str(error)
    except Exception as error:  # reported as this check's failure, naming the step
        failure = f"{step.name} failed: {describe(error)}"
    finally:
        cleanup_error = _delete_collection(client, name)
    if cleanup_error:
        failure = "; ".join(filter(None, [failure, f"could not delete collection {name}: {cleanup_error}"]))
    if failure:
        raise CheckError(failure)
    return detail


def _delete_collection(client: Any, name: str) -> str | None:
    """Deletes a collection; the reason if that failed, None if it is gone (or was never made)."""
    from chromadb.errors import NotFoundError

    try:
        client.delete_collection(name)
    except NotFoundError:
        return None
    except Exception as error:  # reported, and must not mask the check's own failure
        return describe(error)
    return None


def check_data(context: Context) -> str:
    """In a temporary collection: create, upsert, query for known nearest neighbours, count, delete."""
    try:
        context.client = open_client(context.target, context.timeout)
    except CheckError:
        raise
    except Exception as error:
        raise CheckError(f"connect failed: {describe(error)}") from error
    vectors = reference_vectors()
    ids = [vector_id(index) for index in range(len(vectors))]
    probes = neighbour_probes(vectors)

    def work(collection: Any, step: Step) -> str:
        step.name = "upsert"
        collection.upsert(ids=ids, embeddings=vectors)
        step.name = "query"
        result = collection.query(query_embeddings=[query for _, query in probes], n_results=3, include=[])
        found = [matches[0] if matches else None for matches in result["ids"]]
        wrong = [f"{expected} gave {got}" for (expected, _), got in zip(probes, found, strict=True) if got != expected]
        if wrong:
            raise CheckError(f"query: wrong nearest neighbour for {len(wrong)}/{len(probes)}: {', '.join(wrong)}")
        step.name = "count"
        count = collection.count()
        if count != len(ids):
            raise CheckError(f"count: {count}, expected {len(ids)}")
        return f"upserted {len(ids)} vectors, {len(probes)}/{len(probes)} nearest neighbours right, count {count}"

    detail = in_temporary_collection(context.client, work) + ", deleted"
    return f"{detail}; async client: {async_round_trip(context.target, ids, vectors, probes, context.timeout)}"


def async_round_trip(
    target: Target,
    ids: list[str],
    vectors: list[list[float]],
    probes: list[tuple[str, list[float]]],
    timeout: float = REQUEST_TIMEOUT_SECONDS,
) -> str:
    """The data check again with chromadb's AsyncHttpClient, every request bounded by `timeout`."""
    import chromadb
    from chromadb.errors import NotFoundError

    step = Step("connect")

    async def bounded(awaitable: Any) -> Any:
        return await asyncio.wait_for(awaitable, timeout)

    async def run() -> str:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`verify=<str>` is deprecated", category=DeprecationWarning)
            client = await bounded(
                chromadb.AsyncHttpClient(
                    host=target.host,
                    port=target.port,
                    ssl=target.scheme == "https",
                    headers=target.auth,  # the async client ignores a token given through Settings
                    settings=client_settings(target),
                )
            )
            name = f"{COLLECTION_PREFIX}{uuid.uuid4().hex[:16]}"
            try:
                step.name = "create collection"
                collection = await bounded(
                    client.create_collection(
                        name, embedding_function=None, metadata={"created_by": "scripts/smoke_test.py"}
                    )
                )
                step.name = "upsert"
                await bounded(collection.upsert(ids=ids, embeddings=vectors))
                step.name = "query"
                result = await bounded(
                    collection.query(query_embeddings=[query for _, query in probes], n_results=3, include=[])
                )
                found = [matches[0] if matches else None for matches in result["ids"]]
                right = sum(got == expected for (expected, _), got in zip(probes, found, strict=True))
                if right != len(probes):
                    raise CheckError(f"async client: wrong nearest neighbour for {len(probes) - right}/{len(probes)}")
                step.name = "count"
                count = await bounded(collection.count())
                if count != len(ids):
                    raise CheckError(f"async client: count {count}, expected {len(ids)}")
            finally:
                with contextlib.suppress(NotFoundError):
                    await bounded(client.delete_collection(name))
        return f"{right}/{len(probes)} nearest neighbours right, count {count}, deleted"

    try:
        return asyncio.run(run())
    except CheckError:
        raise
    except TimeoutError as error:
        raise CheckError(f"async client: {step.name}: no answer within {timeout:g}s") from error
    except Exception as error:
        raise CheckError(f"async client: {step.name} failed: {describe(error)}") from error


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest sample at or above `fraction` of them."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def check_latency(context: Context) -> str:
    """p50 and p95 of single queries against a small temporary collection."""
    vectors = reference_vectors(LATENCY_VECTOR_COUNT)
    ids = [vector_id(index) for index in range(len(vectors))]
    durations_ms: list[float] = []

    def work(collection: Any, step: Step) -> str:
        step.name = "upsert"
        collection.upsert(ids=ids, embeddings=vectors)
        step.name = "query"
        collection.query(query_embeddings=[vectors[0]], n_results=LATENCY_RESULTS, include=[])  # warm-up
        for index in range(LATENCY_QUERIES):
            started = time.perf_counter()
            collection.query(query_embeddings=[vectors[index]], n_results=LATENCY_RESULTS, include=[])
            durations_ms.append((time.perf_counter() - started) * 1000)
        return f"{len(durations_ms)} queries"

    in_temporary_collection(context.client, work)
    p50, p95 = percentile(durations_ms, 0.50), percentile(durations_ms, 0.95)
    summary = f"p50 {p50:.1f} ms, p95 {p95:.1f} ms over {len(durations_ms)} queries"
    if context.max_p95_ms is not None and p95 > context.max_p95_ms:
        raise CheckError(f"{summary}: p95 above --max-p95-ms {context.max_p95_ms:g}")
    return summary


CHECK_FUNCTIONS: dict[str, Callable[[Context], str]] = {
    "reachable": check_reachable,
    "tls": check_tls,
    "locked": check_locked,
    "data": check_data,
    "latency": check_latency,
}


# ---------------------------------------------------------------------------------------------
# Running


def run_checks(context: Context) -> list[CheckResult]:
    """Every check in order; after the first failure, the rest are skipped."""
    results: list[CheckResult] = []
    failed: str | None = None
    for name in CHECKS:
        if failed:
            result = CheckResult(name, None, 0.0, f"not run: {failed} failed")
            context.report.line(format_line(name, "skip", 0.0, result.detail))
            results.append(result)
            continue
        started = time.monotonic()
        try:
            detail, ok = CHECK_FUNCTIONS[name](context), True
        except CheckError as failure:
            detail, ok = str(failure), False
        except Exception as error:  # an unexpected error fails this check, named, not the run
            detail, ok = f"{type(error).__name__}: {describe(error)}", False
        result = CheckResult(name, ok, round(time.monotonic() - started, 3), context.report.redact(detail))
        context.report.line(format_line(name, "ok" if ok else "FAIL", result.seconds, result.detail))
        results.append(result)
        if not ok:
            failed = name
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the smoke test; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse has printed the usage error (or --help)
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
    report = Report(json_enabled=args.json)
    report.hide(args.token or "", os.environ.get("CHROMA_TOKEN", ""))
    try:
        target = resolve_target(args, dict(os.environ))
    except UsageError as error:
        report.error(str(error))
        return EXIT_USAGE
    report.hide(target.token)
    report.line(f"Smoke test of {target.endpoint} (from {target.source}, token in {target.auth_header})")
    context = Context(
        target=target, report=report, wait_seconds=args.wait, max_p95_ms=args.max_p95_ms, timeout=args.timeout
    )
    try:
        with resolved(*args.resolve) if args.resolve else contextlib.nullcontext():
            results = run_checks(context)
    finally:
        if context.client is not None:
            with contextlib.suppress(Exception):
                context.client.close()
    ok = all(result.ok for result in results)
    if args.json:
        print(json.dumps({"ok": ok, "endpoint": target.endpoint, "checks": [asdict(result) for result in results]}))
    else:
        failed = next((result.name for result in results if result.ok is False), None)
        report.line("PASS: all checks passed" if ok else f"FAIL: the {failed} check failed")
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
