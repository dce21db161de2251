"""A Docker engine for the tests: the one that answers, or a private `dockerd` started and stopped by PID.

No image can be pulled on the machines the tests run on, so the engine only ever holds images that
tests/images.py builds from Debian and PyPI. A private engine gets its own exec root and socket under
a temp dir, no default bridge and no iptables rules: it changes nothing on the host that another
engine or test could see, and published ports still reach 127.0.0.1 through docker-proxy. Its data
root is kept between sessions (so the stand-ins stay built) while no other session uses it; a
session that finds it in use gets a throwaway one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Where an engine already answers, if DOCKER_HOST names none.
DEFAULT_HOST = "unix:///var/run/docker.sock"
START_TIMEOUT_SECONDS = 60
KEPT_ROOT = Path(os.environ.get("CHROMA_INFRA_DOCKER_ROOT") or Path.home() / ".cache" / "chroma-infra" / "dockerd")


class EngineUnavailableError(RuntimeError):
    """No Docker engine can run on this machine; the message says what is missing."""


@dataclass(frozen=True)
class Engine:
    """A Docker engine reached through the docker CLI at `host`."""

    host: str
    version: str
    started_here: bool

    def env(self) -> dict[str, str]:
        """The environment for a docker CLI (or compose) call that talks to this engine."""
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` against this engine; on failure the error carries docker's own stderr."""
        process = subprocess.run(
            ["docker", *args],
            env=self.env(),
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and process.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {process.returncode}: {process.stderr.strip()}")
        return process

    def inspect(self, *names: str, kind: str = "container") -> list[dict]:
        """`docker KIND inspect` as parsed JSON."""
        return json.loads(self.run(kind, "inspect", *names).stdout)


def _server_version(host: str) -> str | None:
    try:
        process = subprocess.run(
            ["docker", "-H", host, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return process.stdout.strip() if process.returncode == 0 and process.stdout.strip() else None


def _why_no_engine() -> str | None:
    if shutil.which("docker") is None or shutil.which("dockerd") is None:
        return "docker and dockerd are not installed (apt-get install docker.io); .ci/run installs them"
    if os.geteuid() != 0:
        return "starting dockerd needs root, and no Docker engine answers at DOCKER_HOST or " + DEFAULT_HOST
    return None


@contextlib.contextmanager
def docker_engine() -> Iterator[Engine]:
    """The engine at DOCKER_HOST (or the default socket) if it answers; else a private dockerd, for the block."""
    host = os.environ.get("DOCKER_HOST") or DEFAULT_HOST
    version = _server_version(host)
    if version is not None:
        yield Engine(host=host, version=version, started_here=False)
        return
    reason = _why_no_engine()
    if reason is not None:
        raise EngineUnavailableError(reason)
    with _data_root() as (data_root, kept):
        # Short paths: the exec root holds unix sockets, whose paths must stay under 108 bytes.
        workdir = Path(tempfile.mkdtemp(prefix="dockerd-", dir="/tmp"))
        try:
            with _private_dockerd(workdir, data_root) as engine:
                if kept:
                    _remove_leftovers(engine)
                yield engine
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def _data_root() -> Iterator[tuple[Path, bool]]:
    """The kept data root if no other session holds it (an flock), else a throwaway one."""
    KEPT_ROOT.mkdir(parents=True, exist_ok=True)
    with (KEPT_ROOT / "lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            throwaway = Path(tempfile.mkdtemp(prefix="data-", dir=KEPT_ROOT))
            try:
                yield throwaway, False
            finally:
                shutil.rmtree(throwaway, ignore_errors=True)
            return
        yield KEPT_ROOT / "data", True


def _remove_leftovers(engine: Engine) -> None:
    """Containers, networks and volumes a killed session left in the kept root (the engine is ours alone)."""
    containers = engine.run("ps", "-aq").stdout.split()
    if containers:
        engine.run("rm", "-f", *containers)
    networks = engine.run("network", "ls", "-q", "--filter", "type=custom").stdout.split()
    if networks:
        engine.run("network", "rm", *networks)
    volumes = engine.run("volume", "ls", "-q").stdout.split()
    if volumes:
        engine.run("volume", "rm", "-f", *volumes)


@contextlib.contextmanager
def _private_dockerd(workdir: Path, data_root: Path) -> Iterator[Engine]:
    host = f"unix://{workdir}/docker.sock"
    # In the data root: dockerd refuses to start on a root whose pidfile names a live dockerd.
    pidfile = data_root.parent / f"{data_root.name}.pid"
    log_path = workdir / "dockerd.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                "dockerd",
                f"--host={host}",
                f"--pidfile={pidfile}",
                f"--data-root={data_root}",
                f"--exec-root={workdir}/exec",
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--storage-driver=overlay2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        version = None
        while version is None:
            if process.poll() is not None:
                raise EngineUnavailableError(
                    f"dockerd exited with {process.returncode}: {log_path.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise EngineUnavailableError(f"dockerd did not answer within {START_TIMEOUT_SECONDS}s; see {log_path}")
            time.sleep(0.3)
            version = _server_version(host)
        yield Engine(host=host, version=version, started_here=True)
    finally:
        _stop_dockerd(process)


def _stop_dockerd(process: subprocess.Popen) -> None:
    """Stops the dockerd started here, by its PID, and waits for it (it stops its containers first)."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
