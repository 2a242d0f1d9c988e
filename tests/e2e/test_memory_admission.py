"""Admission by memory with the real processes: 40 concurrent 8 MiB bodies against a 128 MiB cap.

Every client sends its headers and the first MiB of its body, then holds. Those the cap admits
are held by the ext_proc (their answer waits for the whole body); the others are answered 503
at once. While the admitted ones are held, small requests still pass. Then the held ones send
the rest and get 200, and the process's memory is measured: its peak and what stays after.
"""

from __future__ import annotations

import http.client
import json
import select
import threading

from support.helpers import CHAT, seed_dir, wait_until

DASHSCOPE = "dashscope.aliyuncs.com"
MIB = 1 << 20
CAP = 128 * MIB
SIZE = 8 * MIB - 4096  # just under the default body limit of 8 MiB
CLIENTS = 40
ADMITTED = CAP // SIZE  # 16
# What the process may hold above its idle size plus the cap, at its peak: one body being
# rewritten at a time (parsed, rewritten, serialised: about 4 copies) plus glibc's arena slack.
PEAK_MARGIN = 96 * MIB
# What may stay after the burst: the warm heap kept for the next body (extproc.ops.malloc, 64 MiB)
# plus allocator slack.
AFTER_MARGIN = 64 * MIB + 32 * MIB


def _body(size: int) -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    return body[:-3] + b" " * (size - len(body)) + body[-3:]


def _rss(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


class Client(threading.Thread):
    def __init__(self, port: int, body: bytes, go: threading.Event, early: list):
        super().__init__(daemon=True)
        self.port, self.body, self.go, self.early = port, body, go, early
        self.started = threading.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.answer = b""
        self.error = ""

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.putrequest("POST", f"http://{DASHSCOPE}/", skip_host=True, skip_accept_encoding=True)
            conn.putheader("host", DASHSCOPE)
            conn.putheader("content-type", "application/json")
            conn.putheader("content-length", str(len(self.body)))
            conn.endheaders()
            conn.send(self.body[:MIB])
            self.started.set()
            while not self.go.is_set():
                if select.select([conn.sock], [], [], 0.05)[0]:  # answered before its body was whole
                    self.early.append(self)
                    break
            else:
                conn.send(self.body[MIB:])
            response = conn.getresponse()
            self.status, self.answer = response.status, response.read()
            self.headers = {k.lower(): v for k, v in response.getheaders()}
        except OSError as exc:
            self.error = repr(exc)
        finally:
            self.started.set()
            conn.close()


def test_bodies_past_the_cap_get_503_small_requests_flow_and_memory_stays_bounded(tmp_path, gateway_factory):
    gw = gateway_factory(seed_dir(tmp_path, "01"), extra=["--max-body-bytes-in-flight", "128m", "--access-log", "none"])
    pid = gw.process.pid
    assert gw.request(DASHSCOPE, CHAT).status == 200
    idle = _rss(pid)["VmRSS"]

    body, go, early = _body(SIZE), threading.Event(), []
    clients = [Client(gw.listen_port, body, go, early) for _ in range(CLIENTS)]
    for c in clients:
        c.start()
    for c in clients:
        c.started.wait(60)

    def accounted() -> bool:
        m = gw.metrics()
        held, refused = (m[("llm_gateway_body_bytes_in_flight", frozenset())],
                         m[("llm_gateway_overload_refusals_total", frozenset())])
        return held == ADMITTED * SIZE and refused == CLIENTS - ADMITTED and len(early) == refused

    wait_until(accounted, 60, lambda: f"{gw.metrics()}, {len(early)} answered early")
    # the cap is full, and a small request still passes
    small = [gw.request(DASHSCOPE, CHAT).status for _ in range(5)]
    go.set()
    for c in clients:
        c.join(120)

    assert small == [200] * 5
    assert [c.error for c in clients if c.error] == []
    refused = [c for c in clients if c.status == 503]
    assert sorted(c.status for c in clients) == [200] * ADMITTED + [503] * (CLIENTS - ADMITTED)
    assert set(refused) == set(early)  # refused at their headers, before their bodies
    for c in refused:
        error = json.loads(c.answer)["error"]
        assert (error["code"], error["type"]) == ("overloaded", "server_error")
        assert c.headers["retry-after"] == "1"
    m = gw.metrics()
    assert m[("llm_gateway_body_bytes_in_flight", frozenset())] == 0
    assert m[("llm_gateway_overload_refusals_total", frozenset())] == CLIENTS - ADMITTED

    gw.request(DASHSCOPE, CHAT)  # one more turn of the event loop: the trim after the burst has run
    memory = _rss(pid)
    print(f"\nRSS idle {idle / MIB:.0f} MiB, peak {memory['VmHWM'] / MIB:.0f} MiB, "
          f"after the burst {memory['VmRSS'] / MIB:.0f} MiB (cap {CAP / MIB:.0f} MiB)")
    assert memory["VmHWM"] <= idle + CAP + PEAK_MARGIN
    assert memory["VmRSS"] <= idle + AFTER_MARGIN
