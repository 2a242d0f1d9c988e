"""The 20-line ext_proc client of issue 15, as anyone could write it from xds-protos: connect to
the gateway's ext_proc (TCP HOST:PORT or unix:PATH), send a chat request's headers and body, and
print what came back as one JSON line: the gRPC status, the answer's HTTP status (an immediate
response), and any `authorization` header the gateway set. Run as a separate process, so a test
can run it as another user or inside another network namespace.

    python tests/support/ext_proc_client.py TARGET HOST [TOKEN]"""

import json
import sys

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc


def main(target: str, host: str, token: str | None) -> dict:
    headers = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in
               ((":authority", host), (":method", "POST"), (":path", "/"), ("content-type", "application/json"))]
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    messages = [pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers))),
                pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))]
    metadata = [("authorization", f"Bearer {token}")] if token else []
    out = {"code": "OK", "authorization": None, "status": None, "connected": True}
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            for response in stub.Process(iter(messages), metadata=metadata, timeout=10):
                if response.HasField("immediate_response"):
                    out["status"] = response.immediate_response.status.code
                for h in response.request_headers.response.header_mutation.set_headers:
                    if h.header.key == "authorization":
                        out["authorization"] = h.header.raw_value.decode()
    except grpc.RpcError as error:
        out["code"] = error.code().name
        out["connected"] = error.code() != grpc.StatusCode.UNAVAILABLE
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)))
