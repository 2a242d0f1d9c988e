"""The demo: the gateway on an embedded default (fake providers, the seed manifests)."""
