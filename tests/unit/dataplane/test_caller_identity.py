"""The verified caller through the data plane: the ext_proc decides by it and writes it into the
request's metadata (for the access log), the access-log stream counts usage under its Envoy's
caller, and a Unix-socket connection's caller is the one local mode states."""

from __future__ import annotations

import asyncio
import json

from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.dataplane import grpc_h2 as h2
from extproc.dataplane.accesslog_receiver import AccessLogReceiver, caller_label
from extproc.dataplane.processor import ExternalProcessor
from extproc.policy.caller import LOCAL, Caller, labels_of, local_caller
from extproc.policy.table import TableHolder
from extproc.telemetry.metrics import GatewayMetrics
from support.access_log_entries import DECISION, entry
from support.ext_proc_messages import CHAT, body_msg, headers_msg
from support.manifests import HOME, compile_in_namespaces, provider, route, rule

DASH = "dashscope.aliyuncs.com"
PAYMENTS = Caller("shop", "payments-sa", "payments-7d9f8c7b5-x2x4q", labels_of({"app": "payments"}), "payments")


def table():
    return compile_in_namespaces(
        provider("qwen", DASH, "qwen-turbo", namespace=HOME, api_key="sk-shared",
                 route_configs={"payments": {"model": "qwen-max"}}),
        route("dash", DASH, [{**rule(DASH, name="payments"), "matches": [{"sourceLabels": {"app": "payments"}}]},
                             rule(DASH)], namespace="shop")).table


def exchange(who: Caller, extra: dict[str, str] | None = None) -> list[pb.ProcessingResponse]:
    ext_proc = ExternalProcessor(TableHolder(table()), draw=lambda: 0.0)
    stream = ext_proc.exchange(who)
    out: list[pb.ProcessingResponse] = []
    for message in (headers_msg(DASH, extra=extra), body_msg(CHAT)):
        answers, done = stream.on_message(message.SerializeToString())
        out.extend(pb.ProcessingResponse.FromString(a) for a in answers)
        if done:
            break
    return out


def metadata(response: pb.ProcessingResponse) -> dict:
    return dict(response.dynamic_metadata.fields["llm_gateway"].struct_value.items())


def test_the_decision_and_the_access_logs_metadata_name_the_verified_caller():
    first, body = exchange(PAYMENTS, {"x-llm-gateway-caller": "someone-else", "app": "web"})
    meta = metadata(first)
    assert json.loads(body.request_body.response.body_mutation.body)["model"] == "qwen-max"
    assert meta["rule"] == "payments" and dict(meta["caller"]) == {
        "namespace": "shop", "service_account": "payments-sa", "workload": "payments",
        "pod": "payments-7d9f8c7b5-x2x4q"}
    other = Caller("shop", "web-sa", "web-1", labels_of({"app": "web"}), "web")
    first, body = exchange(other, {"app": "payments"})  # a header claiming the label changes nothing
    assert json.loads(body.request_body.response.body_mutation.body)["model"] == "qwen-turbo"
    assert metadata(first)["caller"]["workload"] == "web"


def test_the_gateways_own_envoy_writes_no_caller():
    first, _ = exchange(LOCAL)
    assert "caller" not in metadata(first)


def test_labels_not_known_answer_503_where_they_decide():
    (refused,) = exchange(Caller("shop", "sa", "gone-pod", None, None))
    assert refused.immediate_response.status.code == 503
    assert json.loads(refused.immediate_response.body)["error"]["code"] == "caller_unresolved"


def test_the_access_log_stream_spends_usage_under_its_envoys_caller():
    """Who spent what (`llm_gateway_spend_*`, extproc.telemetry.spend) by the verified caller of the
    Envoy that reports it: `namespace/workload`, never the pod, never what an entry says."""
    metrics = GatewayMetrics()
    receiver = AccessLogReceiver(metrics)
    batch = als_pb2.StreamAccessLogsMessage()
    batch.http_logs.log_entry.extend([entry(meta={**DECISION, "caller": {"namespace": "other"}, "prompt_tokens": 12,
                                                  "completion_tokens": 30})] * 2)
    receiver.call(PAYMENTS).on_message(batch.SerializeToString())
    receiver.call(Caller("shop", "minted")).on_message(batch.SerializeToString())  # no pod: its ServiceAccount
    receiver.call(LOCAL).on_message(batch.SerializeToString())  # the gateway's own Envoy: nobody in particular
    spent: dict[str, float] = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            assert PAYMENTS.pod not in s.labels.values()  # the pod's name is never a label
            if s.name == "llm_gateway_spend_requests_total":
                spent[s.labels["llm_caller"]] = spent.get(s.labels["llm_caller"], 0) + s.value
    assert spent == {"shop/payments": 2, "shop/minted": 2, "": 2}
    assert caller_label(PAYMENTS) == "shop/payments" and caller_label(local_caller("dev")) == "dev/local"


def test_a_unix_socket_connections_caller_is_the_one_local_mode_states(tmp_path):
    stated = local_caller("shop", {"app": "payments"})
    seen: list[Caller | None] = []

    class Call:
        def on_message(self, message: bytes):
            return None, True

    async def main():
        path = str(tmp_path / "s.sock")
        server = await h2.serve_unix(path, {"/svc/Method": lambda caller: seen.append(caller) or Call()}, 1 << 20,
                                     local=stated)
        import grpc
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            await channel.unary_unary("/svc/Method")(b"")
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert seen == [stated]
