"""Let's Encrypt's stand-in: Debian's `pebble` on the host, with `pebble-challtestsrv` as its DNS.

Every name resolves to 127.0.0.1, and pebble validates HTTP-01 and TLS-ALPN-01 against the host
ports that forward to the guest's 80 and 443. Pebble's own listener has a certificate from a test
CA kept in the cache, so that the Caddy stand-in image that trusts it does not change between runs.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from guest_image import CACHE_ROOT
from machine import ACME_GUEST_ADDRESS, ACME_GUEST_PORT

LISTENER_CA_DIR = CACHE_ROOT.parent / "vm-acme-listener"
ORDER_PATH = "/order-plz"
CA_SUBJECT = "/CN=chroma-infra VM test ACME listener CA"


def listener_ca() -> tuple[Path, Path, Path]:
    """(CA cert, listener cert, listener key) for pebble's HTTPS listener, made once and kept."""
    ca, cert, key = (LISTENER_CA_DIR / name for name in ("ca.pem", "cert.pem", "key.pem"))
    if cert.exists():
        return ca, cert, key
    LISTENER_CA_DIR.mkdir(parents=True, exist_ok=True)
    ca_key = LISTENER_CA_DIR / "ca-key.pem"
    run = lambda *args: subprocess.run(args, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(ca_key), "-out", str(ca), "-days", "3650", "-subj", CA_SUBJECT)  # fmt: skip
    csr = LISTENER_CA_DIR / "listener.csr"
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=pebble")  # fmt: skip
    extensions = LISTENER_CA_DIR / "san.cnf"
    extensions.write_text(f"subjectAltName=IP:{ACME_GUEST_ADDRESS},IP:127.0.0.1,DNS:localhost\n", encoding="utf-8")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "3650", "-extfile", str(extensions))  # fmt: skip
    return ca, cert, key


@dataclass
class Pebble:
    """A running pebble: where the guest reaches it, its log, and its current root."""

    port: int
    management_port: int
    log: Path
    listener_ca: Path
    processes: tuple[subprocess.Popen, ...]

    @property
    def directory_url(self) -> str:
        """The ACME directory as the guest sees it."""
        return f"https://{ACME_GUEST_ADDRESS}:{ACME_GUEST_PORT}/dir"

    def root_pem(self) -> str:
        """Pebble's issuing root (new each time pebble starts), for clients to trust."""
        context = ssl.create_default_context(cafile=str(self.listener_ca))
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return response.read().decode()

    def orders(self) -> int:
        """How many new-order requests pebble has received."""
        return self.log.read_text(errors="replace").count(ORDER_PATH)

    def stop(self) -> None:
        """Stops pebble and its DNS."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=15)


def start(workdir: Path, port: int, management_port: int, dns_port: int, http_port: int, https_port: int) -> Pebble:
    """Starts pebble-challtestsrv (DNS only) and pebble; validations go to the forwarded guest ports."""
    ca, cert, key = listener_ca()
    log = workdir / "pebble.log"
    config = workdir / "pebble-config.json"
    config.write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{port}",
                    "managementListenAddress": f"127.0.0.1:{management_port}",
                    "certificate": str(cert),
                    "privateKey": str(key),
                    "httpPort": http_port,
                    "tlsPort": https_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        ),
        encoding="utf-8",
    )
    common = {"stdin": subprocess.DEVNULL, "stderr": subprocess.STDOUT, "start_new_session": True}
    dns = subprocess.Popen(
        [
            "pebble-challtestsrv",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            f"127.0.0.1:{dns_port}",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            "127.0.0.1:0",
        ],
        stdout=open(workdir / "challtestsrv.log", "ab"),  # noqa: SIM115 - the child keeps it
        **common,
    )
    environment = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    pebble = subprocess.Popen(
        ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{dns_port}"],
        stdout=open(log, "ab"),  # noqa: SIM115 - the child keeps it
        env=environment,
        **common,
    )
    server = Pebble(port, management_port, log, ca, (pebble, dns))
    deadline = time.monotonic() + 30
    while True:
        try:
            server.root_pem()
            return server
        except OSError:
            if time.monotonic() > deadline or pebble.poll() is not None:
                server.stop()
                raise AssertionError(f"pebble did not start: {log.read_text(errors='replace')}") from None
            time.sleep(0.3)
