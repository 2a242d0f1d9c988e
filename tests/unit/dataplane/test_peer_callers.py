"""An egress gateway's caller, per request, from the client certificate its Envoy verified: the
attributes Envoy sends become the workload (its pod's labels from the pod watch), the ext_proc
decides and records by it, headers cannot stand in for it, a request without it is refused, and
the gateway's access-log receiver spends usage under each entry's own caller."""

from __future__ import annotations

import json
from types import SimpleNamespace

from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.dataplane.accesslog_receiver import AccessLogReceiver, entry_caller
from extproc.dataplane.peer_callers import PeerCallers
from extproc.dataplane.processor import ExternalProcessor
from extproc.dataplane.workload_identity import PodDirectory, PodRecord
from extproc.policy.caller import LOCAL, labels_of
from extproc.policy.table import TableHolder
from extproc.protocol import ATTRIBUTES_KEY, PEER_SUBJECT_ATTRIBUTE, PEER_URI_ATTRIBUTE
from extproc.telemetry.metrics import GatewayMetrics
from support.access_log_entries import DECISION, entry
from support.ext_proc_messages import CHAT, body_msg, headers_msg
from support.manifests import HOME, compile_in_namespaces, provider, route, rule

DASH = "dashscope.aliyuncs.com"
PAYMENTS_URI = "spiffe://cluster.local/ns/shop/sa/payments"
PAYMENTS_SUBJECT = "serialNumber=0b6c-11aa,CN=payments-7d9f8c7b5-x2x4q"
WEB = ("spiffe://cluster.local/ns/shop/sa/web", "serialNumber=0b6c-22bb,CN=web")


def pods(clock: float = 100.0) -> PodDirectory:
    directory = PodDirectory(clock=lambda: clock)
    directory.apply("ADDED", PodRecord("shop", "payments-7d9f8c7b5-x2x4q", "0b6c-11aa", labels_of({"app": "payments"}),
                                       "payments"))
    directory.apply("ADDED", PodRecord("shop", "web", "0b6c-22bb", labels_of({"app": "web"}), "web"))
    return directory


def with_peer(message: pb.ProcessingRequest, uri: str | None, subject: str | None) -> pb.ProcessingRequest:
    fields = {k: v for k, v in ((PEER_URI_ATTRIBUTE, uri), (PEER_SUBJECT_ATTRIBUTE, subject)) if v is not None}
    if fields:
        message.attributes[ATTRIBUTES_KEY].update(fields)
    return message


def test_the_caller_is_the_workload_the_certificate_names():
    peers = PeerCallers(pods())
    caller = peers.caller(PAYMENTS_URI, PAYMENTS_SUBJECT)
    assert (caller.namespace, caller.name, caller.pod, caller.uid, caller.workload) == (
        "shop", "payments", "payments-7d9f8c7b5-x2x4q", "0b6c-11aa", "payments")
    assert caller.labels == labels_of({"app": "payments"})
    assert peers.caller(PAYMENTS_URI, PAYMENTS_SUBJECT) is caller  # one object per connection's pair of names
    # a certificate without a pod: its ServiceAccount, no labels
    bare = peers.caller(PAYMENTS_URI, "CN=payments")
    assert (bare.namespace, bare.name, bare.pod, bare.labels) == ("shop", "payments", None, frozenset())
    # names that are not the mesh's: no caller
    assert peers.caller("spiffe://example.org/ns/shop/sa/payments", PAYMENTS_SUBJECT) is None
    assert peers.caller("", "") is None
    assert peers.of(pb.ProcessingRequest()) is None
    assert peers.of(with_peer(headers_msg(DASH), PAYMENTS_URI, None)) is None
    assert peers.of(with_peer(headers_msg(DASH), PAYMENTS_URI, PAYMENTS_SUBJECT)) is caller


def test_a_pod_not_seen_yet_is_read_and_meanwhile_has_unknown_labels():
    reads = []

    def read_pod(namespace, name):
        reads.append((namespace, name))
        return SimpleNamespace(metadata=SimpleNamespace(namespace=namespace, name=name, uid="9f9f-0001",
                                                        labels={"app": "batch"}, owner_references=None,
                                                        resource_version="1"))

    directory = PodDirectory(read_pod=read_pod, clock=lambda: 100.0)
    peers = PeerCallers(directory)
    caller = peers.caller("spiffe://cluster.local/ns/shop/sa/batch", "serialNumber=9f9f-0001,CN=batch-1")
    assert reads == [("shop", "batch-1")] and caller.labels == labels_of({"app": "batch"})
    # a pod that is not there (or has another UID): labels unknown, which fails closed where they decide
    gone = peers.caller("spiffe://cluster.local/ns/shop/sa/batch", "serialNumber=0000-dead,CN=batch-0")
    assert gone.labels is None and gone.workload is None and gone.pod == "batch-0"
    # no pod watch at all (a gateway on files): a pod's labels are unknown
    assert PeerCallers().caller(PAYMENTS_URI, PAYMENTS_SUBJECT).labels is None


def table():
    return compile_in_namespaces(
        provider("qwen", DASH, "qwen-turbo", namespace=HOME, api_key="sk-shared",
                 route_configs={"payments": {"model": "qwen-max"}}),
        route("dash", DASH, [{**rule(DASH, name="payments"), "matches": [{"sourceLabels": {"app": "payments"}}]},
                             rule(DASH)], namespace="shop")).table


def exchange(processor: ExternalProcessor, uri: str | None, subject: str | None,
             headers: dict[str, str] | None = None) -> list[pb.ProcessingResponse]:
    stream = processor.exchange(LOCAL)  # the gateway's own Envoy, on its Unix socket
    out: list[pb.ProcessingResponse] = []
    for message in (with_peer(headers_msg(DASH, extra=headers), uri, subject), body_msg(CHAT)):
        answers, done = stream.on_message(message.SerializeToString())
        out.extend(pb.ProcessingResponse.FromString(a) for a in answers)
        if done:
            break
    return out


def test_the_gateways_ext_proc_decides_and_records_by_the_certificates_workload():
    processor = ExternalProcessor(TableHolder(table()), draw=lambda: 0.0, peers=PeerCallers(pods()))
    first, body = exchange(processor, PAYMENTS_URI, PAYMENTS_SUBJECT)
    assert json.loads(body.request_body.response.body_mutation.body)["model"] == "qwen-max"  # its sourceLabels
    meta = dict(first.dynamic_metadata.fields["llm_gateway"].struct_value.items())
    assert dict(meta["caller"]) == {"namespace": "shop", "service_account": "payments", "workload": "payments",
                                    "pod": "payments-7d9f8c7b5-x2x4q"}
    # the web pod claiming the payments workload in every way a header can: still itself
    first, body = exchange(processor, *WEB, {"app": "payments", "x-llm-gateway-caller": "shop/payments",
                                             "x-forwarded-client-cert": f"URI={PAYMENTS_URI}"})
    assert json.loads(body.request_body.response.body_mutation.body)["model"] == "qwen-turbo"
    assert first.dynamic_metadata.fields["llm_gateway"].struct_value["caller"]["workload"] == "web"
    # no certificate of the mesh: a 403, decided for nobody
    for uri, subject in ((None, None), ("spiffe://example.org/ns/shop/sa/payments", PAYMENTS_SUBJECT)):
        (refused,) = exchange(processor, uri, subject)
        assert refused.immediate_response.status.code == 403
        assert json.loads(refused.immediate_response.body)["error"]["code"] == "caller_unauthenticated"


def test_the_gateways_receiver_spends_by_each_entrys_caller():
    def spent(receiver: AccessLogReceiver, metrics: GatewayMetrics) -> dict[str, float]:
        batch = als_pb2.StreamAccessLogsMessage()
        usage = {**DECISION, "prompt_tokens": 12, "completion_tokens": 30}
        batch.http_logs.log_entry.extend([
            entry(meta={**usage, "caller": {"namespace": "shop", "service_account": "payments",
                                            "workload": "payments", "pod": "payments-1"}}),
            entry(meta={**usage, "caller": {"namespace": "shop", "service_account": "batch"}}),
            entry(meta=usage)])
        receiver.call(LOCAL).on_message(batch.SerializeToString())
        out: dict[str, float] = {}
        for family in metrics.registry.collect():
            for s in family.samples:
                if s.name == "llm_gateway_spend_requests_total":
                    out[s.labels["llm_caller"]] = out.get(s.labels["llm_caller"], 0) + s.value
        return out

    gateway = GatewayMetrics()
    assert spent(AccessLogReceiver(gateway, entry_callers=True), gateway) == {
        "shop/payments": 1, "shop/batch": 1, "": 1}
    # anywhere else an entry's caller is never read: the stream's verified caller spends
    other = GatewayMetrics()
    assert spent(AccessLogReceiver(other), other) == {"": 3}
    assert entry_caller(entry(meta={"caller": {"namespace": ""}})) == ""
