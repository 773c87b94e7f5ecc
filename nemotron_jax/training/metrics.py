"""Watching a run: a tqdm bar per stage, a JSONL metrics log and TensorBoard event files (tensorboardX, no
TensorFlow), and per-stage summary tables."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np

from nemotron_jax.checkpoint.atomic import atomic_write_file

BAR_KEYS = ("reward", "loss", "kl_estimate", "nll")


def _scalar(value: Any) -> float | None:
    array = np.asarray(value)
    return float(array) if array.ndim == 0 else None


def _resume_log(path: str, stage: str, start_step: int) -> list[dict[str, float]]:
    """Drops `stage`'s records past `start_step` from the JSONL log (steps logged after the checkpoint a run
    resumes from, and a line cut by a kill) and returns the scalars of its records up to it, so that a resumed
    stage logs and summarises exactly as an uninterrupted one."""
    if not os.path.exists(path):
        return []
    kept, history, dropped = [], [], False
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped = True
                continue
            if record.get("stage") == stage:
                if record.get("step", 0) > start_step:
                    dropped = True
                    continue
                history.append({k: v for k, v in record.items() if k not in ("stage", "step", "time")})
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        atomic_write_file(path, lambda f: f.writelines(kept))
    return history


class MetricsLogger:
    """Writes `run_dir/metrics.jsonl` (one JSON object per step: stage, step, scalar metrics) and
    `run_dir/tensorboard/<stage>/` event files; arrays such as "moe/expert_load" [layers, E] go to TensorBoard
    as per-layer histograms and per-expert scalars are not written (too many)."""

    def __init__(self, run_dir: str, stage: str, total_steps: int, start_step: int, *, progress: bool = True):
        from tensorboardX import SummaryWriter

        self.stage = stage
        path = os.path.join(run_dir, "metrics.jsonl")
        self.history: list[dict[str, float]] = _resume_log(path, stage, start_step)
        self._jsonl = open(path, "a")
        # On resume, events past the restored step (logged before an interruption) are purged.
        self._writer = SummaryWriter(os.path.join(run_dir, "tensorboard", stage),
                                     purge_step=start_step + 1 if start_step else None)
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=stage, dynamic_ncols=True, leave=True)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        scalars = {}
        for name, value in metrics.items():
            scalar = _scalar(value)
            if scalar is not None:
                scalars[name] = scalar
                self._writer.add_scalar(name, scalar, step)
            elif name == "moe/expert_load":
                for layer, row in enumerate(np.asarray(value)):
                    self._writer.add_histogram(f"moe/expert_load_layer{layer}", row, step)
        record = {"stage": self.stage, "step": step, "time": time.time(), **scalars}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        self.history.append(scalars)
        if self._bar is not None:
            self._bar.update(1)
            shown = {k: f"{scalars[k]:.3g}" for k in BAR_KEYS if k in scalars}
            self._bar.set_postfix(shown, refresh=False)
        return scalars

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._writer.close()
        self._jsonl.close()

    def summary(self) -> dict[str, float]:
        """Mean of each scalar over the first and the last tenth of the logged steps (first/last)."""
        if not self.history:
            return {}
        tenth = max(1, len(self.history) // 10)
        out = {}
        for name in sorted({k for h in self.history for k in h}):
            first = [h[name] for h in self.history[:tenth] if name in h and math.isfinite(h[name])]
            last = [h[name] for h in self.history[-tenth:] if name in h and math.isfinite(h[name])]
            if first and last:
                out[f"{name}/first"] = float(np.mean(first))
                out[f"{name}/last"] = float(np.mean(last))
        return out


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
