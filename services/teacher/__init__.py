"""The teacher service: scores student completions token by token (engines, gRPC/HTTP, Redis queue, workers)."""
