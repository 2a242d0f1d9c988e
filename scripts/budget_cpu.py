"""CPU per request of the budget hook itself, in process (no Envoy, no network): the ext_proc's
two messages (headers, body) and the access-log entry of one request, with and without an
LLMTokenRateLimit matching every request. The best of several repeats (the machine is shared).
Usage: .venv/bin/python scripts/budget_cpu.py"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from extproc.dataplane.accesslog_receiver import AccessLogReceiver
from extproc.policy.budget_gate import BudgetGate
from extproc.config.file_source import load_config
from extproc.telemetry.metrics import GatewayMetrics
from extproc.protocol import METADATA_NAMESPACE
from extproc.dataplane.processor import ExternalProcessor
from extproc.policy.table import TableHolder

PROVIDER = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec:
  host: dashscope.aliyuncs.com
  configs: {defaultConfig: {openAIConfig: {model: qwen-max, apiKey: sk-bench}}}
"""
BUDGET = """---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: everyone}
spec:
  host: dashscope.aliyuncs.com
  key: {header: x-user-id}
  rules: [{name: all, tokens: 1000000000000, per: 1h}]
"""
N = 5000


def messages() -> tuple[bytes, bytes]:
    hdrs = {":method": "POST", ":authority": "dashscope.aliyuncs.com", ":path": "/", "content-type": "application/json",
            "x-user-id": "bench-user", "user-agent": "curl/8", "accept": "*/*"}
    head = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hdrs.items()])))
    body = pb.ProcessingRequest(request_body=pb.HttpBody(
        body=b'{"messages": [{"role": "user", "content": "Please introduce yourself."}]}', end_of_stream=True))
    return head.SerializeToString(), body.SerializeToString()


def log_batch(metadata: struct_pb2.Struct, n: int) -> bytes:
    msg = als_pb2.StreamAccessLogsMessage()
    for _ in range(n):
        e = msg.http_logs.log_entry.add()
        e.response.response_code.value = 200
        e.response.response_code_details = "via_upstream"
        e.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].CopyFrom(metadata)
        fields = e.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].fields
        fields["prompt_tokens"].number_value, fields["completion_tokens"].number_value = 5, 2
        fields["total_tokens"].number_value = 7
    return msg.SerializeToString()


def per_request_us(with_budget: bool) -> float:
    work = Path(tempfile.mkdtemp())
    (work / "c.yaml").write_text(PROVIDER + (BUDGET if with_budget else ""))
    holder = TableHolder(load_config([work / "c.yaml"], {}).table)
    gate = BudgetGate(CollectorRegistry(), lambda: holder.table)
    processor = ExternalProcessor(holder, budgets=gate)
    receiver = AccessLogReceiver(GatewayMetrics(), gate)
    head, body = messages()
    ex = processor.exchange()
    ex.on_message(head)
    first = pb.ProcessingResponse.FromString(ex.on_message(body)[0][0])
    batch = log_batch(first.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value, 100)
    ext_proc = access_log = float("inf")
    for _ in range(7):
        start = time.process_time()
        for _ in range(N):
            ex = processor.exchange()
            ex.on_message(head)
            ex.on_message(body)
        middle = time.process_time()
        for _ in range(N // 100):
            receiver.on_message(batch)
        end = time.process_time()
        ext_proc = min(ext_proc, (middle - start) / N * 1e6)
        access_log = min(access_log, (end - middle) / N * 1e6)
    return ext_proc, access_log


if __name__ == "__main__":
    (e0, a0), (e1, a1) = per_request_us(False), per_request_us(True)
    print(f"CPU per request, without a budget / with one matching every request: ext_proc {e0:.1f} / {e1:.1f} us "
          f"(+{e1 - e0:.1f}), access log {a0:.1f} / {a1:.1f} us (+{a1 - a0:.1f}), "
          f"total {e0 + a0:.1f} / {e1 + a1:.1f} us (+{e1 + a1 - e0 - a0:.1f})")
