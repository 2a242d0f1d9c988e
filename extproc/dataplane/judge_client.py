"""Asking a data policy's judge: a chat request to the model behind a route host, answered
YES or NO (`extproc.policy.data_protection.judge` holds the question and reads the answer).

The judge's host is looked up in the routing table in force, as a request to it would be: its
route's first rule names the provider (host, path, model, key), reached over TLS verified
against the same trust store Envoy's provider clusters use, at the address `--resolve` gives
(else the provider host's own). The whole call is bounded by the rule's timeout; a timeout, a
refused connection, an error status or an answer that is not exactly YES or NO is a failed
judgement, and the rule's `failOpen` decides what it means.

An asynchronous call: the ext_proc answers the body's messages once it is back
(`extproc.dataplane.processor`, `extproc.dataplane.deferred`). aiohttp is loaded on the first
question: a gateway without judges does not pay for it at start.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..policy.data_protection.judge import MAX_ANSWER_BYTES, Judgement, JudgeSpec, question, read_answer
from ..policy.table import RoutingTable

log = logging.getLogger(__name__)

PROVIDER_PORT = 443
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


if TYPE_CHECKING:
    import aiohttp


@dataclass(frozen=True)
class JudgeReach:
    """How judges are reached: as Envoy reaches providers, with the same trust store
    (`--upstream-ca`) and addresses (`--resolve`: host -> (address, port))."""

    ca_file: str = SYSTEM_CA_BUNDLE
    resolve: Mapping[str, tuple[str, int]] = field(default_factory=dict)


def _resolver(addresses: Mapping[str, tuple[str, int]]) -> Any:
    """Provider hosts at the addresses `--resolve` gives (as Envoy's clusters are), others by the
    system resolver."""
    import aiohttp
    from aiohttp.abc import AbstractResolver, ResolveResult

    class Resolved(AbstractResolver):
        def __init__(self) -> None:
            self._system = aiohttp.ThreadedResolver()

        async def resolve(self, host: str, port: int = 0,
                          family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
            found = addresses.get(host)
            if found is None:
                return await self._system.resolve(host, port, family)
            address, at = found
            return [ResolveResult(hostname=host, host=address, port=at, family=socket.AF_INET, proto=0, flags=0)]

        async def close(self) -> None:
            await self._system.close()

    return Resolved()


class JudgeClient:
    """One per data plane: a connection pool to the judges, made on first use."""

    def __init__(self, table: Callable[[], RoutingTable], ca_file: str = SYSTEM_CA_BUNDLE,
                 resolve: Mapping[str, tuple[str, int]] | None = None):
        self._table = table
        self._ca_file = ca_file
        self._resolve = dict(resolve or {})
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            context = ssl.create_default_context(cafile=self._ca_file)
            connector = aiohttp.TCPConnector(ssl=context, resolver=_resolver(self._resolve))
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def ask(self, spec: JudgeSpec, text: str) -> Judgement:
        """The judge's answer on `text`, never an exception."""
        import aiohttp

        route = self._table().route_for(spec.host)
        if route is None or not route.rules:
            log.warning("data policy judge %s: no route serves that host", spec.host)
            return Judgement.UNAVAILABLE
        target = route.rules[0].pick(0.0)
        port = self._resolve.get(target.provider_host, (target.provider_host, PROVIDER_PORT))[1]
        url = f"https://{target.provider_host}:{port}{target.path}"
        headers = {"content-type": "application/json"}
        if target.api_key:
            headers["authorization"] = f"Bearer {target.api_key}"
        try:
            async with asyncio.timeout(spec.timeout_s):
                async with self._open().post(url, data=question(text, spec.model or target.model),
                                             headers=headers) as response:
                    if response.status != 200:
                        log.warning("data policy judge %s answered %d", spec.host, response.status)
                        return Judgement.UNAVAILABLE
                    body = b""  # as it comes, to its end or just past the bound
                    while len(body) <= MAX_ANSWER_BYTES:
                        piece = await response.content.read(MAX_ANSWER_BYTES + 1 - len(body))
                        if not piece:
                            break
                        body += piece
        except TimeoutError:
            return Judgement.TIMEOUT
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("data policy judge %s could not be asked: %s", spec.host, type(exc).__name__)
            return Judgement.UNAVAILABLE
        if len(body) > MAX_ANSWER_BYTES:
            return Judgement.GARBAGE
        return read_answer(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
