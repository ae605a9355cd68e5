"""smartmixed.serve: Open Inference Protocol (KServe V2) over ONNX Runtime."""
