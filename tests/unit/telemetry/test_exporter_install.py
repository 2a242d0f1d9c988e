"""The OTLP exporter's install is checked at start: a broken one is one line with its fix."""

import sys

from extproc.telemetry.spans import exporter_problem


def test_an_exporter_that_loads_is_no_problem():
    assert exporter_problem() is None


def test_an_exporter_that_does_not_load_names_the_repair(monkeypatch):
    # None in sys.modules makes the import fail as the overwritten opentelemetry-proto does
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None)
    problem = exporter_problem()
    assert problem is not None and problem.startswith("--otlp-endpoint: the OTLP exporter does not load")
    assert "pip install --force-reinstall --no-deps opentelemetry-proto==" in problem
