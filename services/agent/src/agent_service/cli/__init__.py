"""Command-line tools for the agent service."""
