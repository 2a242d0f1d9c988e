"""Envoy's configuration: the bootstrap, and the clusters and routes sent over xDS."""
