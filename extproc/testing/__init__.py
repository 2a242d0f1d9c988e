"""Helpers shared by the tests and the benches: a stand-in Envoy, load generation."""
