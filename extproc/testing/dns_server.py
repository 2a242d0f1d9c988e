"""A DNS server for tests and benches: on a UDP port of its own, it answers the names it is
told with an IPv4 address, answers NXDOMAIN for others and never answers a third set, as a
throttled or broken DNS server does. Names move between the sets while it runs (a name that
starts resolving later). Envoy is pointed at it with `extproc up --dns-resolver`.

Packets are read and written with dnspython; the server is a thread with one socket.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


def _name(host: str) -> str:
    return host.lower().rstrip(".")


@dataclass
class DnsServer:
    """`answers`: name -> IPv4 address (an A record; AAAA gets an empty answer); `silent`: names
    whose queries are dropped; every other name: NXDOMAIN. `queries` counts queries per name."""

    answers: dict[str, str] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)
    host: str = "127.0.0.1"
    bind_port: int = 0  # 53 for a server the system resolver asks (resolv.conf names no port)
    ttl: int = 5
    queries: Counter[str] = field(default_factory=Counter)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        assert self._sock is not None, "not started"
        return int(self._sock.getsockname()[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def answer(self, host: str, address: str) -> None:
        """From now on `host` resolves to `address`."""
        with self._lock:
            self.silent.discard(_name(host))
            self.answers[_name(host)] = address

    def drop(self, host: str) -> None:
        """From now on queries for `host` get no answer."""
        with self._lock:
            self.answers.pop(_name(host), None)
            self.silent.add(_name(host))

    def forget(self, host: str) -> None:
        """From now on `host` gets NXDOMAIN."""
        with self._lock:
            self.answers.pop(_name(host), None)
            self.silent.discard(_name(host))

    def start(self) -> DnsServer:
        self.answers = {_name(h): a for h, a in self.answers.items()}
        self.silent = {_name(h) for h in self.silent}
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((self.host, self.bind_port))
        self._sock.settimeout(0.1)  # a closed socket does not wake a thread blocked reading it: look now and then
        self._thread = threading.Thread(target=self._serve, name="dns-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()  # the thread's recvfrom fails and it ends
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while self._sock is sock:
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            reply = self._reply(data)
            if reply is not None:
                try:
                    sock.sendto(reply, peer)
                except OSError:
                    return

    def _reply(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = _name(question.name.to_text())
        with self._lock:
            self.queries[name] += 1
            address = self.answers.get(name)
            silent = name in self.silent
        if silent:
            return None
        response = dns.message.make_response(query)
        if address is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, self.ttl, "IN", "A", address))
        return response.to_wire()  # AAAA and others of a known name: no data, NOERROR
