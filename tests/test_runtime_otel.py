"""Chroma's OpenTelemetry export, run for real: the rendered env in, OTLP/gRPC spans out.

A real `chroma run` at the pinned version gets the chroma environment of the VM's rendered compose
file, pointed (through OtelSettings.endpoint, a renderer parameter) at a real OTLP/gRPC receiver on
loopback. The same workload runs once per otelGranularity. This shows that spans arrive with the
configured service name, that the configured headers arrive as gRPC metadata, that each
granularity changes what Chroma exports, and that without an endpoint no OTel variable is
rendered and Chroma still starts and answers.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter

import chromadb
import pytest
from chromadb.config import Settings
from live import LOOPBACK, chroma_server, otlp_sink, wait_until
from vm_fixtures import chroma_environment, vm_files

from components.runtime import GRANULARITY_LEVELS, OtelSettings
from components.settings import load_settings

SERVICE_NAME = "chroma-otel-test"
HEADERS = "x-team=abc,x-env=prod"
GRANULARITIES = ("operation", "operation_and_segment", "all")
# The workload's last request; once its span is in, the workload's earlier spans are too.
LAST_SPAN = "GET /api/v2/tenants/{tenant}/databases/{database}/collections/{collection_id}/count"
PER_REQUEST_SPAN = re.compile(r"^(GET|POST|PUT|PATCH|DELETE) /api/v2/")


def workload(port: int) -> None:
    """The same few requests for every granularity: create, upsert, query, count."""
    client = chromadb.HttpClient(host=LOOPBACK, port=port, settings=Settings(anonymized_telemetry=False))
    collection = client.create_collection("traced", embedding_function=None)
    collection.upsert(ids=["a", "b"], embeddings=[[1.0, 0.0], [0.0, 1.0]], documents=["first", "second"])
    assert collection.query(query_embeddings=[[1.0, 0.1]], n_results=1)["ids"] == [["a"]]
    assert collection.count() == 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Span names per granularity, and the sinks that received them, after the same workload."""
    with contextlib.ExitStack() as stack:
        sinks = {}
        for granularity in GRANULARITIES:
            sink = stack.enter_context(otlp_sink())
            otel = OtelSettings(sink.endpoint, SERVICE_NAME, HEADERS, granularity)
            chroma = stack.enter_context(
                chroma_server(tmp_path_factory.mktemp(granularity), chroma_environment(vm_files(otel=otel)))
            )
            workload(chroma.port)
            sinks[granularity] = sink
        # Spans leave in batches (OTEL_BSP_SCHEDULE_DELAY from the rendered env), and Chroma does
        # not flush when it stops: wait for the last request's span while it runs, then one more batch.
        for granularity, sink in sinks.items():
            wait_until(lambda sink=sink: LAST_SPAN in sink.span_names(), 30, f"the {granularity} workload's spans")
        time.sleep(2)
        yield {granularity: Counter(sink.span_names()) for granularity, sink in sinks.items()}, sinks


def test_rendered_env_sets_the_batch_delay_the_waits_rely_on():
    env = chroma_environment(vm_files(otel=OtelSettings("http://127.0.0.1:4317", SERVICE_NAME)))
    assert env["OTEL_BSP_SCHEDULE_DELAY"] == "1000"


def test_spans_carry_the_configured_service_name(exported):
    _, sinks = exported
    for granularity, sink in sinks.items():
        assert sink.exports, granularity
        assert {name for export in sink.exports for name in export.service_names()} == {SERVICE_NAME}, granularity


def test_configured_headers_arrive_as_grpc_metadata(exported):
    _, sinks = exported
    for granularity, sink in sinks.items():
        for export in sink.exports:
            assert export.metadata.get("x-team") == "abc", granularity
            assert export.metadata.get("x-env") == "prod", granularity


def test_operation_granularity_exports_only_per_request_spans(exported):
    names, _ = exported
    assert names["operation"], "the per-request spans must stay at the coarsest granularity"
    assert [name for name in names["operation"] if not PER_REQUEST_SPAN.match(name)] == []


def test_each_finer_granularity_exports_more(exported):
    names, _ = exported
    operation, segment, everything = (set(names[granularity]) for granularity in GRANULARITIES)
    assert operation < segment < everything
    assert "collection_upsert" in segment - operation
    assert "parsing_json" in everything - segment
    # The per-request spans are the same whatever the granularity.
    assert {name for name in everything if PER_REQUEST_SPAN.match(name)} == operation


def test_all_is_chromas_default():
    with_all = OtelSettings("http://127.0.0.1:4317", SERVICE_NAME, granularity="all")
    unset = OtelSettings("http://127.0.0.1:4317", SERVICE_NAME)
    assert GRANULARITY_LEVELS["all"] is None
    assert chroma_environment(vm_files(otel=with_all)) == chroma_environment(vm_files(otel=unset))


@pytest.mark.parametrize("otel", [None, OtelSettings("", SERVICE_NAME, HEADERS, "operation")], ids=["none", "empty"])
def test_without_an_endpoint_no_otel_variable_and_chroma_answers(otel, tmp_path):
    env = chroma_environment(vm_files(otel=otel))
    assert env == {"CHROMA_LISTEN_ADDRESS": "127.0.0.1"}, (
        "an empty CHROMA_OPEN_TELEMETRY__ENDPOINT makes Chroma panic; no OTel variable at all"
    )
    with chroma_server(tmp_path, env) as chroma:
        client = chromadb.HttpClient(host=LOOPBACK, port=chroma.port, settings=Settings(anonymized_telemetry=False))
        assert client.create_collection("untraced", embedding_function=None).count() == 0
    assert "panic" not in chroma.log.read_text(encoding="utf-8")


def test_header_values_with_percent_comma_equals_and_space_arrive_unchanged(tmp_path):
    """The exporter percent-decodes OTEL_EXPORTER_OTLP_HEADERS values; the settings encode them so they survive."""
    value = "100%41 off, a=b %zz"
    with otlp_sink() as sink:
        loaded = load_settings(
            {"target": "azure", "otelEndpoint": sink.endpoint, "otelHeaders": {"x-api-key": value, "x-env": "prod"}},
            location="westeurope",
        )
        env = chroma_environment(vm_files(otel=loaded.otel))
        assert env["OTEL_EXPORTER_OTLP_HEADERS"] != f"x-api-key={value},x-env=prod", "the value must be encoded"
        with chroma_server(tmp_path, env) as chroma:
            workload(chroma.port)
            wait_until(lambda: LAST_SPAN in sink.span_names(), 30, "the workload's spans")
        assert sink.exports
        for export in sink.exports:
            assert export.metadata.get("x-api-key") == value
            assert export.metadata.get("x-env") == "prod"
