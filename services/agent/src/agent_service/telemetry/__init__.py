"""Telemetry: Prometheus metrics, OpenTelemetry tracing set-up, and the per-call observer's instruments."""
