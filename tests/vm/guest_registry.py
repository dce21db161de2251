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

from engine import Engine
from guest_image import CACHE_ROOT
from user_data import CADDY_TRUST_PATH

from components import runtime

IMAGES_CACHE = CACHE_ROOT.parent / "vm-images"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def guest_images_dir(engine: Engine, images: dict[str, str], listener_ca: Path, chroma_image: str) -> Path:
    """A folder of tars plus images.list (tar, pinned name) and <tar>.id, for the guests to load."""
    caddy_id, chroma_id = images[runtime.CADDY_IMAGE], images[chroma_image]
    ca_pem = listener_ca.read_text(encoding="utf-8")
    digest = _digest(caddy_id, chroma_id, ca_pem, CADDY_TRUST_PATH, Path(__file__).read_text(encoding="utf-8"))
    target = IMAGES_CACHE / digest
    if (target / "images.list").exists():
        return target
    IMAGES_CACHE.mkdir(parents=True, exist_ok=True)
    for stale in IMAGES_CACHE.iterdir():
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix="building-", dir=IMAGES_CACHE))
    try:
        context = staging / "caddy-context"
        context.mkdir()
        (context / "acme-listener-ca.pem").write_text(ca_pem, encoding="utf-8")
        (context / "Dockerfile").write_text(
            f"FROM {caddy_id}\nCOPY acme-listener-ca.pem {CADDY_TRUST_PATH}\n", encoding="utf-8"
        )
        caddy_test_tag = f"chroma-vm-test-caddy:{digest}"
        engine.run("build", "--quiet", "--tag", caddy_test_tag, str(context), timeout=600)
        shutil.rmtree(context)
        entries = [("chroma.tar", chroma_image, chroma_image), ("caddy.tar", runtime.CADDY_IMAGE, caddy_test_tag)]
        for tar, _name, source in entries:
            engine.run("save", "--output", str(staging / tar), source, timeout=600)
            image_id = engine.run("image", "inspect", "--format", "{{.Id}}", source).stdout.strip()
            (staging / f"{tar}.id").write_text(image_id + "\n", encoding="utf-8")
        engine.run("rmi", caddy_test_tag, check=False)
        (staging / "images.list").write_text("".join(f"{tar} {name}\n" for tar, name, _ in entries), encoding="utf-8")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
