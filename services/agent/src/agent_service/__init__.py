"""A Strands agent served over gRPC streaming."""

__version__ = "0.1.0"
