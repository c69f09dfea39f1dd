"""Model tooling: tiny random models for tests, and SmolLM2 teacher/student folders prepared from a GGUF."""
