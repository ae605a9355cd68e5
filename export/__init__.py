"""smartmixed.export: lower frozen mixed networks to ONNX, verify them, write a model repository.

    from smartmixed.export import export_module, export_run

``export_run(run_dir=..., repository=...)`` exports a trained run folder; ``export_module(model,
example_input, repository=..., name=...)`` a user's own module holding frozen mixed layers.

The exports are lazy (PEP 562): ``import smartmixed.export.lower`` runs this file, and the graph
builder must load without torch (tests/test_contract.py).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "export_module": "module",
    "ExportResult": "repository",
    "export_run": "repository",
    "verify_entry": "repository",
}

__all__ = ["ExportResult", "export_module", "export_run", "verify_entry"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
