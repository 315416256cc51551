"""Sends one nested trace with the OpenTelemetry Python SDK and prints what it sent as JSON.

Usage: send_trace.py grpc|http ENDPOINT [SERVICE]

The trace: a SERVER root with a CLIENT child and an INTERNAL grandchild; attributes of every type
(string, bool, int, double, and arrays of each); events with attributes; a link to another span
context; an ERROR status on the client span. The printed JSON lists every finished span with its
ids (lower-case hex), parent, kind, times, status, attributes, events, links and the resource, so the
test can compare what arrives downstream field by field.
"""
import json
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

proto, endpoint = sys.argv[1], sys.argv[2]
service = sys.argv[3] if len(sys.argv) > 3 else "checkout"

if proto == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10)
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=10)

resource = Resource.create({"service.name": service, "deployment.environment": "test", "host.cores": 2})
provider = TracerProvider(resource=resource)
memory = InMemorySpanExporter()
provider.add_span_processor(SimpleSpanProcessor(memory))
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracer = provider.get_tracer("tailweave.e2e", "1.2.3")

linked = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331,
                     is_remote=True, trace_flags=TraceFlags(1))

with tracer.start_as_current_span("POST /checkout", kind=SpanKind.SERVER, attributes={
    "http.method": "POST", "http.status_code": 500, "user.vip": True, "cart.total": 12.5,
    "tags": ["a", "b"], "counts": [1, 2, 3], "flags": [True, False], "ratios": [0.5, 1.5],
}) as root:
    root.add_event("request.received", {"bytes": 1024, "path": "/checkout"})
    with tracer.start_as_current_span("charge card", kind=SpanKind.CLIENT, links=[Link(linked, {"link.kind": "retry-of"})]) as client:
        client.set_attribute("peer.service", "payments")
        with tracer.start_as_current_span("compute tax", kind=SpanKind.INTERNAL) as internal:
            internal.set_attribute("tax.rate", 0.19)
        client.add_event("exception", {"exception.type": "CardDeclined", "exception.message": "declined"})
        client.set_status(Status(StatusCode.ERROR, "card declined"))

provider.shutdown()

def attrs(a):
    out = {}
    for k, v in (a or {}).items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out

spans = []
for s in memory.get_finished_spans():
    spans.append({
        "name": s.name,
        "trace_id": format(s.context.trace_id, "032x"),
        "span_id": format(s.context.span_id, "016x"),
        "parent_span_id": format(s.parent.span_id, "016x") if s.parent else "",
        "kind": s.kind.value,
        "start": s.start_time,
        "end": s.end_time,
        "status_code": s.status.status_code.value,
        "status_message": s.status.description or "",
        "attributes": attrs(s.attributes),
        "events": [{"name": e.name, "time": e.timestamp, "attributes": attrs(e.attributes)} for e in s.events],
        "links": [{"trace_id": format(l.context.trace_id, "032x"), "span_id": format(l.context.span_id, "016x"),
                   "attributes": attrs(l.attributes)} for l in s.links],
        "resource": attrs(s.resource.attributes),
        "scope": s.instrumentation_scope.name,
    })
print(json.dumps(spans))
