"""The ext_proc's own work per request, in process: no sockets, no event loop, a warm cache.
On its own: `python -m benchmarks work` (or `python scripts/bench_work.py`).

`scripts/bench` measures whole processes under load. This measures only the Python our gateway
runs for one request on top of what the floor's server also does (reading the messages), on
messages shaped like the ones Envoy sends in the bench (seen on the wire: the same headers, body
and access-log fields): choosing and rewriting (three ext_proc messages), and turning the
finished request's access-log entry into metrics. It is a lower bound for that work in the
running process, where caches are colder and the event loop and framing come on top; with the
bench's figures it says how much of the floor's 10 % margin the work itself takes
(`floor_margin`).
"""

from __future__ import annotations

import argparse
import time

from .measure import best_us

HOST = "dashscope.aliyuncs.com"
BODY = b'{"messages": [{"role": "user", "content": "Please introduce yourself."}]}'
ENTRIES_PER_BATCH = 24  # about what Envoy's 16 KiB gRPC log buffer holds


def _request_messages() -> list[bytes]:
    """Headers, the body, Envoy's empty end-of-stream chunk: as Envoy sends them for wrk's request."""
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    headers = [(":authority", HOST), (":path", "/"), (":method", "POST"), (":scheme", "http"),
               ("accept-encoding", "identity"), ("content-length", str(len(BODY))),
               ("content-type", "application/json"), ("x-forwarded-proto", "http"),
               ("x-request-id", "4b7da332-d267-4689-a371-f07cba936023")]
    first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers])))
    first.protocol_config.request_body_mode = processing_mode_pb2.ProcessingMode.STREAMED
    first.protocol_config.send_body_without_waiting_for_header_response = True
    body = pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY))
    end = pb.ProcessingRequest(request_body=pb.HttpBody(end_of_stream=True))
    return [m.SerializeToString() for m in (first, body, end)]


def _log_batch(answer: bytes) -> bytes:
    """A batch of access-log entries as Envoy sends them for a JSON answer: its time points,
    addresses, the decision (from `answer`, the gateway's own) and usage as metadata."""
    from envoy.config.core.v3 import address_pb2, base_pb2
    from envoy.data.accesslog.v3 import accesslog_pb2
    from envoy.service.accesslog.v3 import als_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.protocol import METADATA_NAMESPACE

    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    for field, port in (("downstream_remote_address", 57428), ("downstream_local_address", 38139),
                        ("upstream_remote_address", 42053), ("upstream_local_address", 54770)):
        getattr(common, field).CopyFrom(address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address="127.0.0.1", port_value=port)))
    common.start_time.FromNanoseconds(time.time_ns())
    for field, nanos in (("time_to_last_rx_byte", 752_998), ("time_to_first_upstream_tx_byte", 4_248_117),
                         ("time_to_last_upstream_tx_byte", 4_249_559), ("time_to_first_upstream_rx_byte", 5_497_652),
                         ("time_to_last_upstream_rx_byte", 6_043_673), ("time_to_first_downstream_tx_byte", 6_060_628),
                         ("time_to_last_downstream_tx_byte", 6_064_444)):
        getattr(common, field).FromNanoseconds(nanos)
    common.upstream_cluster = "llm_provider_dashscope_aliyuncs_com"
    common.upstream_request_attempt_count = 1
    common.custom_tags.update({"ttft_us": "5498", "generation_us": "566"})
    decided = pb.ProcessingResponse.FromString(answer).dynamic_metadata.fields[METADATA_NAMESPACE].struct_value
    meta = common.metadata.filter_metadata[METADATA_NAMESPACE]
    meta.MergeFrom(decided)
    meta.update({"response_model": "qwen1.5-72b-chat", "prompt_tokens": 12, "completion_tokens": 34,
                 "total_tokens": 46})
    entry.request.request_method = base_pb2.POST
    entry.request.request_id = "4b7da332-d267-4689-a371-f07cba936023"
    entry.request.authority = HOST
    entry.request.path = "/compatible-mode/v1/chat/completions"
    entry.response.response_code.value = 200
    entry.response.response_code_details = "via_upstream"
    entry.response.response_headers["content-type"] = "application/json"
    batch = als_pb2.StreamAccessLogsMessage()
    batch.identifier.log_name = "llm_gateway"
    batch.http_logs.log_entry.extend([entry] * ENTRIES_PER_BATCH)
    return batch.SerializeToString()


def seed_gateway():
    """The gateway's ext_proc and access-log receiver on the seed's first provider, as `up` wires
    them (metrics, budgets, passive health), with a stand-in key: (processor, receiver, metrics)."""
    from extproc.config.compile import compile_config
    from extproc.config.loader import load_paths
    from extproc.dataplane.accesslog_receiver import AccessLogReceiver
    from extproc.dataplane.processor import ExternalProcessor
    from extproc.demo.run import manifests_dir
    from extproc.policy.budget_gate import BudgetGate
    from extproc.policy.passive_health import AttemptObserver, PassiveHealth
    from extproc.policy.table import TableHolder
    from extproc.telemetry.metrics import GatewayMetrics

    objects, _ = load_paths([str(manifests_dir() / "01-LLMProvider.yaml")], {"YOUR_DASHSCOPE_API_KEY": "sk-bench"})
    holder = TableHolder(compile_config(objects).table)
    metrics = GatewayMetrics()
    budgets = BudgetGate(metrics.registry, lambda: holder.table, None, False)
    processor = ExternalProcessor(holder, budgets=budgets)
    receiver = AccessLogReceiver(metrics, budgets, AttemptObserver(
        PassiveHealth(), metrics.registry, hosts=lambda: holder.table.cluster_hosts),
        prices=lambda: holder.table.prices)
    return processor, receiver, metrics


def processor_work_us(seconds: float = 1.0) -> dict[str, float]:
    """µs per request of: reading the three ext_proc messages (what the floor's server does too),
    the gateway's handling of them beyond that (choosing, rewriting, building the answers), and
    its handling of the request's access-log entry (metrics, passive health)."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    processor, receiver, metrics = seed_gateway()
    messages = _request_messages()

    def read() -> int:
        for message in messages:
            pb.ProcessingRequest.FromString(message)
        return 1

    def answer() -> int:
        exchange = processor.exchange()
        for message in messages:
            answers, _ = exchange.on_message(message)
        exchange.on_close()
        return 1

    exchange = processor.exchange()
    answers = [a for m in messages for a in exchange.on_message(m)[0]]
    if len(answers) != 3:
        raise RuntimeError(f"the gateway answered the bench's request with {len(answers)} messages, not 3")
    batch = _log_batch(answers[0])

    def log() -> int:
        receiver.on_message(batch)
        return ENTRIES_PER_BATCH

    before = _recorded(metrics)
    log()
    if _recorded(metrics) != (before[0] + ENTRIES_PER_BATCH, before[1] + ENTRIES_PER_BATCH):
        raise RuntimeError("the bench's access-log entries were not recorded as answered requests with usage")

    def best(run) -> float:
        """The best of loops of 2000 requests or more, for `seconds`."""
        return best_us(run, seconds=seconds, batch=2000)

    reading = best(read)
    return {"read_messages_us": reading, "choose_and_rewrite_us": best(answer) - reading,
            "access_log_entry_us": best(log)}


def _recorded(metrics) -> tuple[float, float]:
    """Successful requests, and answers whose output tokens were counted, over every series."""
    totals = {"llm_gateway_requests_total": 0.0, "gen_ai_client_token_usage_count": 0.0}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("outcome", "success") == "success" \
                    and sample.labels.get("gen_ai_token_type", "output") == "output":
                totals[sample.name] += sample.value
    return totals["llm_gateway_requests_total"], totals["gen_ai_client_token_usage_count"]


def floor_margin(floor_all_us: float, floor_ext_proc_us: float, gateway_all_us: float,
                 gateway_ext_proc_us: float, target: float = 0.9, own_work_us: float = 0.0) -> dict[str, float]:
    """Where the gateway's CPU per request goes beyond the floor's, against what `target` of the
    floor's throughput allows (requests/s follow CPU per request on a busy machine): Envoy's extra
    work for the gateway's answers (the rewritten body, the decision's metadata, which its logs
    carry), the ext_proc's extra, what is allowed in all, what that leaves the ext_proc; and the
    best a processor giving Envoy the same answers could reach if its own work cost nothing, or
    only `own_work_us` (that work measured in process: no framing, no event loop)."""
    envoy_extra = max((gateway_all_us - gateway_ext_proc_us) - (floor_all_us - floor_ext_proc_us), 0.0)
    allowed = floor_all_us / target - floor_all_us
    return {"envoy_extra_us": envoy_extra, "ext_proc_extra_us": gateway_ext_proc_us - floor_ext_proc_us,
            "allowed_extra_us": allowed, "left_for_ext_proc_us": allowed - envoy_extra,
            "best_with_free_processor": floor_all_us / (floor_all_us + envoy_extra),
            "best_with_own_work_only": floor_all_us / (floor_all_us + envoy_extra + own_work_us)}


def main(argv: list[str]) -> int:
    """`python -m benchmarks work`: the figures, each the best of loops over 2 seconds."""
    argparse.ArgumentParser(prog="python -m benchmarks work", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    for name, value in processor_work_us(2.0).items():
        print(f"{name:24s} {value:7.2f}")
    return 0
