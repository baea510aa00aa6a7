"""Progress of long steps: a bar in the terminal and, inside a Prefect run, a progress artifact."""
from __future__ import annotations

import os
import re
import sys
import time

from tqdm.auto import tqdm


def _in_prefect_run() -> bool:
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class Progress:
    """Callable ``progress(done, total)``: updates a tqdm bar and a Prefect progress artifact.

    The artifact is updated at most every ``every`` seconds; outside a Prefect
    run only the bar is shown. ``CNNCODES_PROGRESS=0`` hides the bar.
    """

    def __init__(self, description: str, unit: str = "img", key: str | None = None, every: float = 2.0):
        self.description = description
        self.unit = unit
        self.key = re.sub(r"[^a-z0-9-]+", "-", (key or description).lower()).strip("-")[:60] or "progress"
        self.every = every
        self._bar = None
        self._artifact = None
        self._last = 0.0
        self._disabled = os.environ.get("CNNCODES_PROGRESS", "1") == "0"

    def __call__(self, done: int, total: int) -> None:
        if not self._disabled:
            if self._bar is None:
                self._bar = tqdm(total=total, desc=self.description, unit=self.unit, file=sys.stderr,
                                 dynamic_ncols=True, mininterval=0.5)
            self._bar.total = total
            self._bar.update(done - self._bar.n)
        now = time.monotonic()
        if _in_prefect_run() and (done >= total or now - self._last >= self.every or self._artifact is None):
            self._last = now
            self._artifact_update(100.0 * done / total if total else 100.0)

    def _artifact_update(self, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self._artifact is None:
                self._artifact = create_progress_artifact(progress=percent, key=self.key,
                                                          description=self.description)
            else:
                update_progress_artifact(artifact_id=self._artifact, progress=percent)
        except Exception:  # noqa: BLE001 - progress display must never fail a run
            self._artifact = self._artifact or "unavailable"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
