"""The gRPC door: decode, call the chat core, encode; statuses from the core's one error table."""
