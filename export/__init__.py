"""smartmixed.export: lower frozen mixed networks to ONNX, verify them, write a model repository."""
