"""The first instrumented service of the ebpf_receiver test: a client that calls through nginx.

Usage: service_a.py NGINX_PORT OTLP_GRPC_ENDPOINT HOST_NAME COUNT

For each of COUNT requests: an INTERNAL root span "checkout" with a CLIENT span "GET /items/<i>"
whose context is injected as `traceparent` into a plain http.client request to nginx (one
connection per request). Prints one JSON line per request: trace id, root and client span ids
(lower-case hex) and the HTTP status, then flushes its spans to tailweave.
"""
import http.client
import json
import os
import sys

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

nginx_port, endpoint, host, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])

provider = TracerProvider(resource=Resource.create({
    "service.name": "frontend", "host.name": host, "process.pid": os.getpid()}))
provider.add_span_processor(BatchSpanProcessor(
    OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10), schedule_delay_millis=100))
tracer = provider.get_tracer("tailweave.ebpf-test")

for i in range(count):
    with tracer.start_as_current_span("checkout", kind=SpanKind.INTERNAL) as root:
        with tracer.start_as_current_span(f"GET /items/{i}", kind=SpanKind.CLIENT) as client:
            headers = {}
            inject(headers)
            conn = http.client.HTTPConnection("127.0.0.1", nginx_port, timeout=10)
            conn.request("GET", f"/items/{i}", headers=headers)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            client.set_attribute("http.status_code", resp.status)
        print(json.dumps({
            "trace_id": format(root.get_span_context().trace_id, "032x"),
            "root_span_id": format(root.get_span_context().span_id, "016x"),
            "client_span_id": format(client.get_span_context().span_id, "016x"),
            "status": resp.status,
        }), flush=True)

provider.force_flush()
provider.shutdown()
