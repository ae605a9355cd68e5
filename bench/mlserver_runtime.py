"""A custom MLServer runtime that runs a smartmixed ``model.onnx`` with ONNX Runtime, as
smartmixed-serve does with ``--intra-op-threads 1`` (all graph optimisations, 1 intra-op and 1
inter-op thread, the CPU provider). It runs inside MLServer's own environment (.venv-mlserver),
never the project's, and imports nothing from smartmixed: bench/server.py's start_mlserver copies it beside the
model-settings.json it writes (MLServer puts a model's folder on the import path). Inputs and
outputs go through MLServer's NumpyCodec, as MLServer itself unpacks them.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

INTRA_OP_THREADS = 1


class OnnxRuntimeModel(MLModel):
    """model-settings.json's ``parameters.uri`` (a model.onnx) in one ORT session."""

    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = INTRA_OP_THREADS
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if len(payload.inputs) != 1:
            raise InferenceError(f"expected 1 input, got {len(payload.inputs)}")
        x = NumpyCodec.decode_input(payload.inputs[0])  # (B, D) or (B, C, H, W), float32
        values = self._session.run(self._outputs, {self._input: x})
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._outputs, values, strict=True)
            ],
        )
