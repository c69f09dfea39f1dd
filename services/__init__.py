"""prefix-distill services: the teacher service (engines, transports, queue, workers) and model tooling."""
