"""smartmixed.export: lower frozen mixed networks to ONNX, verify them, write a model repository.

    from smartmixed.export import export_module, export_run

``export_run(run_dir=..., repository=...)`` exports a trained run folder; ``export_module(model,
example_input, repository=..., name=...)`` a user's own module holding frozen mixed layers.
"""

from __future__ import annotations

from smartmixed.export.module import export_module
from smartmixed.export.repository import ExportResult, export_run, verify_entry

__all__ = ["ExportResult", "export_module", "export_run", "verify_entry"]
