"""The local stack's proxy and Chroma, run with the real programs and judged by the smoke test.

The Caddyfile is the one ChromaLocalDocker uploads, rendered with LOCAL_SITE; on loopback only the
declared ProxySite parameters change (site address, upstream, bind address, health port, token file).
"""

import dataclasses
import json

import pytest
from live import caddy_server, chroma_server, free_port, write_token_file

from components import runtime
from components.local_docker import LOCAL_SITE
from scripts import smoke_test

TOKEN = "LocalRuntimeToken0123456789abcdefgh"


@pytest.fixture(scope="module")
def local_endpoint(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("local")
    with chroma_server(workdir / "chroma", runtime.chroma_env(None)) as chroma:
        port, health_port = free_port(), free_port()
        site = dataclasses.replace(
            LOCAL_SITE,
            site_address=f"http://127.0.0.1:{port}",
            upstream=f"127.0.0.1:{chroma.port}",
            bind_address="127.0.0.1",
            health_port=health_port,
            token_file=write_token_file(workdir / "caddy" / "token", TOKEN),
        )
        caddyfile = runtime.render_caddyfile(site, runtime.AUTHORIZATION)
        with caddy_server(workdir / "caddy", caddyfile, [port, health_port]):
            yield f"http://127.0.0.1:{port}"


def run_smoke(capsys, *args):
    code = smoke_test.main([*args, "--json", "--wait", "20"])
    return code, json.loads(capsys.readouterr().out)


def test_local_variant_passes_every_smoke_check(local_endpoint, capsys):
    code, report = run_smoke(capsys, "--endpoint", local_endpoint, "--token", TOKEN)
    assert code == 0, report
    assert [check["name"] for check in report["checks"]] == list(smoke_test.CHECKS)
    assert all(check["ok"] for check in report["checks"]), report


def test_local_variant_refuses_a_wrong_token(local_endpoint, capsys):
    code, report = run_smoke(capsys, "--endpoint", local_endpoint, "--token", "Wrong" + TOKEN)
    assert code == 1
    failed = [check["name"] for check in report["checks"] if check["ok"] is False]
    assert failed == ["locked"]


def test_local_variant_refuses_the_token_in_the_other_header(local_endpoint, capsys):
    code, report = run_smoke(
        capsys, "--endpoint", local_endpoint, "--token", TOKEN, "--auth-header", runtime.X_CHROMA_TOKEN
    )
    assert code == 1
    assert [check["name"] for check in report["checks"] if check["ok"] is False] == ["locked"]
