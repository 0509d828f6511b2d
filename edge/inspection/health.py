"""Per-model health for the observed state and heartbeats: for every active ONNX model, whether
this version loaded and how it served over the last window (what rollout health gates read).
"""

from __future__ import annotations

from pathlib import Path

import structlog

from fieldline.edge.inspection.model import ModelLoadError, load_model
from fieldline.shared.config import InspectionSettings
from fieldline.shared.health import InspectionModelHealth, ModelHealth

log = structlog.get_logger(__name__)


class ModelHealthReporter:
    """Builds ModelHealth from the inspection runtime's numbers.

    A model that no inspection rule uses is loaded once per version to check that it can serve
    (then released), so a rollout of a model ahead of the policy that uses it is still gated.
    """

    def __init__(self, settings: InspectionSettings | None = None):
        self.settings = settings or InspectionSettings()
        # (name, version, path) -> None when it loads, else the load error
        self._checked: dict[tuple[str, str, str], str | None] = {}

    def report(
        self, active: dict[str, tuple[str, Path]], served: dict[str, InspectionModelHealth]
    ) -> dict[str, ModelHealth]:
        """active: name -> (version, path) of active ONNX artifacts; served: inspection health."""
        out: dict[str, ModelHealth] = {}
        for name, (version, path) in active.items():
            h = served.get(name)
            if h is None:
                error = self._load_check(name, version, Path(path))
                out[name] = ModelHealth(
                    name=name, version=version, loaded=error is None, serving=False, error=error
                )
            elif h.loaded and h.version == version:
                out[name] = ModelHealth(
                    name=name,
                    version=version,
                    loaded=True,
                    serving=True,
                    requests=h.requests,
                    errors=h.errors,
                    window_s=h.window_s,
                    window_requests=h.window_requests,
                    window_errors=h.window_errors,
                    error_rate=h.error_rate,
                    p95_latency_ms=h.p95_latency_ms,
                )
            else:
                # The rule's model failed to load: an older version may still be serving.
                error = h.error or f"{name} {version} is not loaded"
                out[name] = ModelHealth(
                    name=name, version=version, loaded=False, serving=False, error=error[:2000]
                )
        live = {(n, v, str(p)) for n, (v, p) in active.items()}
        self._checked = {k: v for k, v in self._checked.items() if k in live}
        return out

    def _load_check(self, name: str, version: str, path: Path) -> str | None:
        key = (name, version, str(path))
        if key not in self._checked:
            try:
                load_model(name, version, path, self.settings)
                self._checked[key] = None
            except ModelLoadError as exc:
                log.error(
                    "model failed its load check", model=name, version=version, error=str(exc)
                )
                self._checked[key] = str(exc)[:2000]
        return self._checked[key]
