"""smartmixed.bench: what the activation mix costs (training steps; later latency and HTTP)."""
