"""A real OTLP/gRPC trace receiver for tests: what every process of a stack exports its spans to
(OTEL_EXPORTER_OTLP_ENDPOINT=127.0.0.1:<port>), kept in memory with the service name of each span."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc


class Collector:
    """A real OTLP/gRPC TraceService: keeps every span it receives with its service name."""

    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        collector = self
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with collector.lock:
                    for rs in request.resource_spans:
                        service = next(
                            (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "?"
                        )
                        for ss in rs.scope_spans:
                            collector.spans.extend((service, s) for s in ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def snapshot(self):
        with self.lock:
            return list(self.spans)

    def stop(self) -> None:
        self.server.stop(grace=0)
