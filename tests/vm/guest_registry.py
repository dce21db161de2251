"""The registry's stand-in for the guests: the stand-in images (tests/images.py) saved as tars.

The guest's chroma-test-images.service loads them from a read-only 9p share before chroma.service
starts, and tags each as the name the compose file pins, so compose pulls nothing. Caddy's tar adds
one file to the Caddy stand-in: the CA of pebble's listener, which the Caddyfile's `acme_ca_root`
line names. The tars are cached by the image ids and that CA.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import yaml
from engine import Engine
from guest_image import CACHE_ROOT
from user_data import CADDY_TRUST_PATH

from components import runtime

IMAGES_CACHE = CACHE_ROOT.parent / "vm-images"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def compose_images(compose_text: str) -> list[str]:
    """The image of every service in the compose file the run command delivers."""
    compose = yaml.safe_load(compose_text)
    return sorted({service["image"] for service in compose["services"].values()})


def guest_images_dir(engine: Engine, images: dict[str, str], listener_ca: Path, needed: list[str]) -> Path:
    """A folder of tars plus images.list (tar, pinned name) and <tar>.id, for the guest image to preload."""
    missing = [name for name in needed if name not in images]
    if missing:
        raise AssertionError(f"the VM's compose file runs {missing}, which tests/images.py builds no stand-in for")
    ca_pem = listener_ca.read_text(encoding="utf-8")
    digest = _digest(
        *[f"{name}={images[name]}" for name in needed],
        ca_pem,
        CADDY_TRUST_PATH,
        Path(__file__).read_text(encoding="utf-8"),
    )
    target = IMAGES_CACHE / digest
    if (target / "images.list").exists():
        return target
    IMAGES_CACHE.mkdir(parents=True, exist_ok=True)
    for stale in IMAGES_CACHE.iterdir():
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix="building-", dir=IMAGES_CACHE))
    try:
        entries = []
        for index, name in enumerate(needed):
            source = images[name]
            if name == runtime.CADDY_IMAGE:
                source = f"chroma-vm-test-caddy:{digest}"
                context = staging / "caddy-context"
                context.mkdir()
                (context / "acme-listener-ca.pem").write_text(ca_pem, encoding="utf-8")
                (context / "Dockerfile").write_text(
                    f"FROM {images[name]}\nCOPY acme-listener-ca.pem {CADDY_TRUST_PATH}\n", encoding="utf-8"
                )
                engine.run("build", "--quiet", "--tag", source, str(context), timeout=600)
                shutil.rmtree(context)
            tar = f"image-{index}.tar"
            engine.run("save", "--output", str(staging / tar), source, timeout=600)
            image_id = engine.run("image", "inspect", "--format", "{{.Id}}", source).stdout.strip()
            (staging / f"{tar}.id").write_text(image_id + "\n", encoding="utf-8")
            if source != images[name]:
                engine.run("rmi", source, check=False)
            entries.append((tar, name))
        (staging / "images.list").write_text("".join(f"{tar} {name}\n" for tar, name in entries), encoding="utf-8")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
