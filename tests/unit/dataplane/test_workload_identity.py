"""The pods callers' tokens are bound to (extproc.dataplane.workload_identity), and the TokenReview
authenticator resolving a pod-bound token to a caller with the pod's labels and workload: label
changes, a pod gone, the API server out of reach (a fake clock, pods as the official client
gives them)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from extproc.dataplane.authentication import PENDING, ReviewResult, TokenReviewAuthenticator, identity_of
from extproc.dataplane.workload_identity import PodDirectory, pod_reference, record_of
from extproc.policy.caller import Caller, labels_of

AUD = "llm-gateway"
POD_EXTRA = (("authentication.kubernetes.io/pod-name", ("payments-7d9f8c7b5-x2x4q",)),
             ("authentication.kubernetes.io/pod-uid", ("uid-1",)))


def pod(name: str = "payments-7d9f8c7b5-x2x4q", uid: str = "uid-1", labels: dict | None = None,
        namespace: str = "shop", version: str = "1"):
    """A pod as the official client gives it (`V1Pod`): the fields read."""
    labels = {"app": "payments", "pod-template-hash": "7d9f8c7b5"} if labels is None else labels
    owner = SimpleNamespace(kind="ReplicaSet", name="payments-7d9f8c7b5", controller=True)
    return SimpleNamespace(metadata=SimpleNamespace(name=name, namespace=namespace, uid=uid, labels=labels,
                                                    owner_references=[owner], resource_version=version))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pod_record_names_its_workload_and_labels():
    record = record_of(pod())
    assert (record.namespace, record.name, record.uid, record.workload) == ("shop", "payments-7d9f8c7b5-x2x4q",
                                                                           "uid-1", "payments")
    assert dict(record.labels)["app"] == "payments"


def test_the_review_names_the_bound_pod():
    assert pod_reference(dict(POD_EXTRA)) == ("payments-7d9f8c7b5-x2x4q", "uid-1")
    assert pod_reference({}) is None
    assert pod_reference({"authentication.kubernetes.io/pod-name": ["a", "b"],
                          "authentication.kubernetes.io/pod-uid": ["u"]}) is None
    reviewed = identity_of(ReviewResult(True, "system:serviceaccount:shop:payments", (AUD,), extra=POD_EXTRA), AUD)
    assert reviewed == Caller("shop", "payments", "payments-7d9f8c7b5-x2x4q", uid="uid-1")


def test_a_label_change_makes_a_new_caller_and_a_gone_pod_keeps_its_labels_for_the_grace_only():
    clock = Clock()
    pods = PodDirectory(grace_s=30, clock=clock)
    assert pods.caller("shop", "sa", "p", "uid-1", clock.now) is None  # never seen: read it first
    pods.apply("ADDED", record_of(pod()))
    first = pods.caller("shop", "sa", "p", "uid-1", clock.now)
    assert first.labels == labels_of({"app": "payments", "pod-template-hash": "7d9f8c7b5"})
    assert (first.workload, first.pod) == ("payments", "payments-7d9f8c7b5-x2x4q")
    assert pods.caller("shop", "sa", "p", "uid-1", clock.now) is first  # the same object: its view is kept
    pods.apply("MODIFIED", record_of(pod(version="2")))  # a status change: nothing a decision reads
    assert pods.caller("shop", "sa", "p", "uid-1", clock.now) is first
    pods.apply("MODIFIED", record_of(pod(labels={"app": "web"}, version="3")))  # relabelled
    moved = pods.caller("shop", "sa", "p", "uid-1", clock.now)
    assert moved is not first and moved.labels == labels_of({"app": "web"})
    pods.apply("DELETED", record_of(pod(labels={"app": "web"}, version="4")))
    clock.now += 30
    assert pods.caller("shop", "sa", "p", "uid-1", clock.now).labels == labels_of({"app": "web"})
    clock.now += 1
    gone = pods.caller("shop", "sa", "p", "uid-1", clock.now)
    assert gone.labels is None and gone.workload is None and (gone.namespace, gone.name) == ("shop", "sa")


def test_the_api_server_out_of_reach_for_longer_than_the_grace_fails_closed_until_a_new_list():
    clock = Clock()
    pods = PodDirectory(grace_s=30, clock=clock)
    pods.replace_all([record_of(pod())])
    assert pods.caller("shop", "sa", "p", "uid-1", clock.now).labels is not None
    pods.lost_since = clock.now  # what the watch thread records on its first failure
    clock.now += 30
    assert pods.caller("shop", "sa", "p", "uid-1", clock.now).labels is not None
    clock.now += 1
    assert pods.caller("shop", "sa", "p", "uid-1", clock.now).labels is None
    pods.replace_all([record_of(pod())])  # back in contact: listed again
    pods.lost_since = None
    assert pods.caller("shop", "sa", "p", "uid-1", clock.now).labels is not None
    # a pod missing from a new list is gone from then on
    pods.replace_all([])
    clock.now += 31
    assert pods.caller("shop", "sa", "p", "uid-1", clock.now).labels is None


def test_the_watch_thread_lists_watches_and_records_losing_contact():
    clock = Clock()
    events = [("ADDED", pod(uid="uid-2", name="other", labels={"app": "batch"}))]
    state = {"lists": 0, "watches": 0}

    def list_pods():
        state["lists"] += 1
        if state["lists"] > 1:
            raise ConnectionError("API server down")
        return [pod()], "7"

    def watch_pods(version):
        state["watches"] += 1
        yield from events
        raise ConnectionError("watch cut")

    pods = PodDirectory(list_pods, watch_pods, grace_s=30, clock=clock)
    pods.start()
    deadline = time.monotonic() + 10
    while pods.lost_since is None and time.monotonic() < deadline:
        time.sleep(0.01)
    pods.stop()
    assert state["lists"] >= 1 and state["watches"] == 1
    assert pods.lost_since == clock.now
    assert pods.caller("shop", "sa", "p", "uid-2", clock.now).workload == "payments-7d9f8c7b5"  # its owner's name


def test_a_pod_bound_token_resolves_to_its_pods_labels_read_once_when_new():
    clock = Clock()
    reads: list[tuple[str, str]] = []
    current = {"pod": pod()}

    def read_pod(namespace, name):
        reads.append((namespace, name))
        return current["pod"]

    pods = PodDirectory(read_pod=read_pod, grace_s=30, clock=clock)

    def review(token, audience):
        return ReviewResult(True, "system:serviceaccount:shop:payments", (audience,), extra=POD_EXTRA)

    auth = TokenReviewAuthenticator(review, AUD, clock=clock, pods=pods)

    async def main():
        assert auth.cached("t") is PENDING
        token, caller = await auth.verify("t")
        return caller

    caller = asyncio.run(main())
    assert (caller.namespace, caller.name, caller.pod, caller.workload) == ("shop", "payments",
                                                                           "payments-7d9f8c7b5-x2x4q", "payments")
    assert auth.cached("t") is caller and reads == [("shop", "payments-7d9f8c7b5-x2x4q")]
    pods.apply("MODIFIED", record_of(pod(labels={"app": "web"})))
    assert auth.cached("t").labels == labels_of({"app": "web"})  # the next stream, no restart
    assert reads == [("shop", "payments-7d9f8c7b5-x2x4q")]


def test_a_pod_that_cannot_be_read_or_has_another_uid_gives_unknown_labels():
    clock = Clock()
    for found in (None, pod(uid="uid-other")):
        pods = PodDirectory(read_pod=lambda ns, name, found=found: found, grace_s=30, clock=clock)

        def review(token, audience):
            return ReviewResult(True, "system:serviceaccount:shop:payments", (audience,), extra=POD_EXTRA)

        auth = TokenReviewAuthenticator(review, AUD, clock=clock, pods=pods)
        _, caller = asyncio.run(auth.verify("t"))
        assert caller.labels is None and caller.workload is None and caller.namespace == "shop"


def test_a_token_bound_to_no_pod_has_no_labels():
    def review(token, audience):
        return ReviewResult(True, "system:serviceaccount:shop:minted", (audience,))

    auth = TokenReviewAuthenticator(review, AUD, pods=PodDirectory())
    _, caller = asyncio.run(auth.verify("t"))
    assert caller == Caller("shop", "minted") and caller.labels == frozenset() and caller.pod is None


def test_a_bookmark_moves_the_watch_on_and_loses_no_contact():
    """The official client gives a BOOKMARK's object as the API's JSON (a dict, only its
    resourceVersion): the watch goes on from there, nothing is lost, and the next watch starts at
    the bookmark's version (read as a pod, it failed the watch at every bookmark)."""
    clock = Clock()
    versions: list[str] = []

    def list_pods():
        return [pod()], "7"

    def watch_pods(version):
        versions.append(version)
        if len(versions) == 1:
            yield "BOOKMARK", {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "42"}}
            yield "ADDED", pod(uid="uid-2", name="other", labels={"app": "batch"}, version="43")
            yield "BOOKMARK", {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "50"}}
        else:
            time.sleep(0.01)

    pods = PodDirectory(list_pods, watch_pods, grace_s=30, clock=clock)
    pods.start()
    deadline = time.monotonic() + 10
    while len(versions) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pods.stop()
    assert versions[:2] == ["7", "50"]  # the second watch from the last bookmark: no new list
    assert pods.lost_since is None
    assert pods.caller("shop", "sa", "other", "uid-2", clock.now).labels == labels_of({"app": "batch"})
