"""Service settings: environment variables with prefix SMARTMIXED_, or command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    """Every field can be set as SMARTMIXED_<FIELD> (e.g. SMARTMIXED_MAX_BATCH_SIZE=32)."""

    model_config = SettingsConfigDict(env_prefix="SMARTMIXED_", extra="ignore")

    repository: Path = Field(
        Path("models"), description="Model repository: NAME/VERSION/model.onnx (as export writes)"
    )
    host: str = Field("127.0.0.1", description="Address to bind")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port)")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu",
        description="cpu; cuda (CUDAExecutionProvider must be active, or startup fails); "
        "auto (CUDA when it really works, else CPU with a logged warning)",
    )
    intra_op_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime intra-op threads per session (default: ORT's)"
    )
    max_batch_size: int = Field(
        64, ge=0, description="Dynamic batching: most rows merged into one run (0: no batching)"
    )
    max_batch_delay_ms: float = Field(
        1.0, ge=0, description="Dynamic batching: longest wait for more requests (0: no batching)"
    )
    max_request_rows: int = Field(1024, ge=1, description="Most rows (samples) in one request")
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest request body; larger ones get 413"
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, requests need 'Authorization: Bearer KEY' or 'X-API-Key: KEY' "
        "(health endpoints stay open)",
    )
    skip_bad_models: bool = Field(
        False,
        description="Serve the models that load and list the others as not ready, "
        "instead of refusing to start",
    )
    inference_threads: int = Field(
        4, ge=1, description="Threads running inference off the event loop"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1 and self.max_batch_delay_ms > 0
