"""Service settings: environment variables with prefix SMARTMIXED_, or command-line flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServeSettings(BaseSettings):
    """Every field can be set as SMARTMIXED_<FIELD> (e.g. SMARTMIXED_MAX_BATCH_SIZE=32)."""

    model_config = SettingsConfigDict(env_prefix="SMARTMIXED_", extra="ignore")

    repository: Path = Field(
        Path("models"), description="Model repository: NAME/VERSION/model.onnx (as export writes)"
    )
    host: str = Field("127.0.0.1", description="Address to bind")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port)")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the gRPC endpoint (inference.GRPCInferenceService, as Triton's), "
        "on the same host; 0 turns it off",
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="A second HTTP port, on the same host, serving only /v2/health/live, "
        "/v2/health/ready and /metrics from its own thread (as Triton's --metrics-port, e.g. "
        "8002): probes answered at once while inference clients fill the main port; "
        "0 (default): none",
    )
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
        description="When set and not empty, requests need 'Authorization: Bearer KEY' or "
        "'X-API-Key: KEY' (health endpoints stay open); empty means no key",
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

    # ---- connections (enforced by the HTTP protocol, serve/server.py) -------------------------
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request line + headers; larger ones get 431"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A request's line and headers must arrive within this time"
    )
    body_timeout_s: float = Field(
        15.0, gt=0, description="A request's body must arrive within this time after its headers"
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="An idle keep-alive connection is closed after this time"
    )
    send_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A client that takes none of its answer for this long (writes blocked) "
        "is disconnected (reset) and the answer dropped",
    )
    max_unsent_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024 * 1024,
        description="Most answer bytes held, server-wide, for clients that stopped reading (in "
        "the server's buffers and the kernel's); past it the connections stalled longest are "
        "reset",
    )
    max_connections: int = Field(
        2048,
        ge=8,
        description="Most open connections (also capped below the process's open-file "
        "limit); at the cap, the oldest idle connection makes room, else 503",
    )
    # ---- load shedding (serve/app.py) ---------------------------------------------------------
    max_queue: int = Field(
        128,
        ge=1,
        description="Most inference requests admitted per model (queued or running; "
        "default: two dynamic batches); more get 503 with Retry-After at once",
    )
    request_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Deadline of an admitted inference request; work still queued "
        "then is dropped with 503",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) sent with a 503")
    max_body_bytes_in_flight: int | None = Field(
        None,
        ge=1024,
        description="Most request-body bytes held at once, server-wide: each request's "
        "Content-Length, reserved before its body is read, held until it is answered; more "
        "get 503 with Retry-After (default: max_request_bytes)",
    )
    # ---- repository (serve/models.py) -------------------------------------------------------
    max_model_bytes: int = Field(
        1024**3, ge=1024, description="Largest model.onnx the server will read"
    )
    # ---- model management (serve/management.py), Triton's names ----------------------------
    model_control_mode: Literal["none", "explicit", "poll"] = Field(
        "none",
        description="none: load every model at start, no changes after (load/unload refused); "
        "explicit: load the --load-model ones at start, then what POST "
        "/v2/repository/models/NAME/load|unload asks; poll: load every model at start, then "
        "follow the repository's changes every repository_poll_secs",
    )
    load_model: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Explicit mode: a model to load at start (repeat the flag for more; '*': "
        "every model; default none; as a variable, names separated by commas)",
    )
    repository_poll_secs: float = Field(
        15.0, gt=0, description="Poll mode: seconds between two scans of the repository"
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value):
        """SMARTMIXED_API_KEY= (empty, as docker-compose passes by default) means no key."""
        if value is None:
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        return text if text.strip() else None

    @model_validator(mode="after")
    def _body_budget_fits_a_request(self):
        budget = self.max_body_bytes_in_flight
        if budget is not None and budget < self.max_request_bytes:
            raise ValueError(
                f"max_body_bytes_in_flight ({budget}) is below max_request_bytes "
                f"({self.max_request_bytes}): a request of the largest size could never be read"
            )
        return self

    @field_validator("load_model", mode="before")
    @classmethod
    def _names_from_text(cls, value):
        """SMARTMIXED_LOAD_MODEL=a,b (or a JSON list, for a name holding a comma)."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            return json.loads(value)
        return [name.strip() for name in value.split(",") if name.strip()]

    @model_validator(mode="after")
    def _load_model_is_explicit(self):
        """--load-model means something only in explicit mode (the others load everything)."""
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError(
                f"load_model ({', '.join(self.load_model)}) needs model_control_mode explicit "
                f"(it is {self.model_control_mode}, which loads every model)"
            )
        return self

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1 and self.max_batch_delay_ms > 0

    @property
    def body_budget(self) -> int:
        """max_body_bytes_in_flight, or its default: one request of the largest size. A body
        costs more than its size until it is answered (its parsed values, an echoed id, the
        answer): with room for two 16 MiB requests, 512 clients sending 5 MB requests grew the
        server by 89 MB; with room for one, by 73-78 MB."""
        return self.max_body_bytes_in_flight or self.max_request_bytes
