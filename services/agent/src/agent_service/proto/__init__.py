"""Code generated from protos/agent/agent.proto by `make protos`; do not edit."""
