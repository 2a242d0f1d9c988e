"""The Kubernetes source's watch loop, with the API replaced by fakes: a 410 Gone makes it list
again, other failures make it back off and list again, and a status-only change is no change."""

from __future__ import annotations

import threading

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from extproc.config import kubernetes_source as source_module
from extproc.config.kubernetes_source import KubernetesSource


def route(name: str, generation: int = 1, status: dict | None = None, version: str = "1") -> dict:
    return {"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMRoute",
            "metadata": {"name": name, "namespace": "default", "generation": generation, "resourceVersion": version},
            "spec": {"host": name, "rules": [{"backendRefs": [{"providerHost": "p.example.com"}]}]},
            **({"status": status} if status else {})}


class FakeCustom:
    def __init__(self, lists: list[list[dict]]):
        self.lists = lists
        self.calls = 0

    def list_cluster_custom_object(self, group, version, plural, **kw):
        items = self.lists[min(self.calls, len(self.lists) - 1)]
        self.calls += 1
        return {"items": [dict(i) for i in items], "metadata": {"resourceVersion": f"list-{self.calls}"}}


def make_source(monkeypatch, custom: FakeCustom, streams: list) -> tuple[KubernetesSource, list[str]]:
    """A source whose watch streams are scripted: each item is a list of events or an exception."""
    src = KubernetesSource(lambda compiled: None, api_client=kubernetes.client.ApiClient())
    src._custom = custom
    src._versions = {"LLMRoute": "start", "LLMProvider": "start"}
    seen_versions: list[str] = []
    signals = []
    src._signal = lambda: signals.append(1)
    src.signals = signals

    class FakeWatch:
        def stream(self, func, resource_version, **kw):
            seen_versions.append(resource_version)
            if not streams:
                src._stopping.set()
                return
            step = streams.pop(0)
            if isinstance(step, Exception):
                raise step
            yield from step

    monkeypatch.setattr(kubernetes.watch, "Watch", FakeWatch)
    monkeypatch.setattr(source_module, "MAX_BACKOFF_S", 0.01)
    src._back_off = lambda what, exc, backoff: 0.0
    return src, seen_versions


def run_watch(src: KubernetesSource) -> None:
    t = threading.Thread(target=src._watch_kind, args=("LLMRoute",), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "the watch loop did not stop"


def test_410_gone_lists_again_and_watches_from_the_new_version(monkeypatch):
    custom = FakeCustom([[route("a"), route("b")]])  # what the list after the 410 finds
    src, versions = make_source(monkeypatch, custom, [
        ApiException(status=410, reason="Gone"),
        [{"type": "ADDED", "object": route("c", version="7")}],
    ])
    run_watch(src)
    assert custom.calls == 1  # the relist after 410
    assert versions[:2] == ["start", "list-1"]  # watched again from the list's resourceVersion
    assert versions[2] == "7"  # and then from the last event's
    assert {k[2] for k in src._objects} == {"a", "b", "c"}
    assert src.signals  # the rebuild was asked for


def test_error_event_410_also_lists_again(monkeypatch):
    custom = FakeCustom([[route("a")]])
    src, versions = make_source(monkeypatch, custom, [[{"type": "ERROR", "object": {"code": 410}}]])
    run_watch(src)
    assert custom.calls == 1 and versions[1] == "list-1"


@pytest.mark.parametrize("failure", [ApiException(status=500, reason="boom"), ConnectionRefusedError("down")])
def test_other_failures_back_off_and_relist(monkeypatch, failure):
    custom = FakeCustom([[route("a")]])
    src, versions = make_source(monkeypatch, custom, [failure])
    backoffs = []
    src._back_off = lambda what, exc, backoff: backoffs.append(what) or 0.0
    run_watch(src)
    assert backoffs == ["watch of llmroutes"] and custom.calls == 1


def test_status_only_change_does_not_rebuild(monkeypatch):
    custom = FakeCustom([[]])
    src, _ = make_source(monkeypatch, custom, [[
        {"type": "ADDED", "object": route("a")},
        {"type": "MODIFIED",
         "object": route("a", status={"conditions": [{"type": "Accepted", "status": "True"}]}, version="2")},
        {"type": "MODIFIED", "object": route("a", generation=2, version="3")},
        {"type": "DELETED", "object": route("a", generation=2, version="4")},
    ]])
    run_watch(src)
    assert len(src.signals) == 3  # added, spec changed, deleted; the status write alone is not a change
    assert not src._objects
