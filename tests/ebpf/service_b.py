"""The second instrumented service of the ebpf_receiver test: an HTTP server whose handler asks an
uninstrumented Redis for a key.

Usage: service_b.py PORT REDIS_PORT OTLP_GRPC_ENDPOINT HOST_NAME

Each GET /items/<id> is one SERVER span (parent taken from the incoming `traceparent`) with one
CLIENT span (db.system=redis) around a raw RESP `GET item:<id>`: no Redis client library is
needed, and the bytes on the wire are exactly one command. The resource carries host.name and
process.pid, which the join matches against the eBPF spans' host and pid. Prints "ready" once
listening; exits on SIGTERM after flushing its spans.
"""
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

port, redis_port, endpoint, host = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

provider = TracerProvider(resource=Resource.create({
    "service.name": "items", "host.name": host, "process.pid": os.getpid()}))
provider.add_span_processor(BatchSpanProcessor(
    OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10), schedule_delay_millis=100))
tracer = provider.get_tracer("tailweave.ebpf-test")


def redis_get(key):
    cmd = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)
    with socket.create_connection(("127.0.0.1", redis_port)) as s:
        s.sendall(cmd)
        return s.recv(4096)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        ctx = extract(dict(self.headers.items()))
        with tracer.start_as_current_span("GET /items", context=ctx, kind=SpanKind.SERVER,
                                          attributes={"http.method": "GET", "http.target": self.path}):
            item = self.path.rsplit("/", 1)[-1].encode()
            with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT, attributes={
                    "db.system": "redis", "db.statement": "GET item:" + item.decode()}):
                reply = redis_get(b"item:" + item)
            body = b'{"item": "%s", "redis": %d}' % (item, len(reply))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)


def stop(*_):
    threading.Thread(target=server.shutdown).start()


signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
server.serve_forever()
provider.force_flush()
provider.shutdown()
