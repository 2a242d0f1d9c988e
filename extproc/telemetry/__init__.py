"""Telemetry: what a finished request's access-log entry says, as GenAI metrics."""
