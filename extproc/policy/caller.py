"""Who is calling: the verified caller a decision is taken for.

A caller is proven by the Envoy's credentials on its control-plane stream (see
`extproc.dataplane.authentication`), never by anything the application sends.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified caller. `namespace` None: the gateway's own Envoy (local mode, a static token),
    which may use every object."""

    namespace: str | None
    name: str


LOCAL = Caller(None, "local")
