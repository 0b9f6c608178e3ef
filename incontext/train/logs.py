"""Run logs: JSON-lines + CSV metrics (truncated on resume so a resumed run's file equals an uninterrupted
one's), a tqdm progress bar, and TensorBoard when the ``tensorboard`` package is installed. Rank 0 only."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from incontext.train.checkpoint import write_text_atomic

__all__ = ["MetricsLog", "read_jsonl"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill: drop it
            break
    return rows


class MetricsLog:
    """``metrics.jsonl`` (every row), ``train.csv`` and ``eval.csv`` (one per kind) in ``out_dir``.

    Args:
        out_dir: run folder.
        resume_step: rows after this step are dropped (they belong to the killed run's lost steps).
        tensorboard: "auto" (use it if installed), true (require it) or false.
        enabled: false on ranks other than 0.
    """

    def __init__(self, out_dir: Path, resume_step: int | None, tensorboard: Any = "auto",
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.out_dir = Path(out_dir)
        self.tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rows = read_jsonl(self.path) if resume_step is not None else []
        rows = [r for r in rows if r.get("step", 0) <= (resume_step or 0)]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self._rows = rows
        self._rewrite_csv()
        if tensorboard not in (False, "false", None, "off"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                if tensorboard is True or tensorboard == "true":
                    raise ImportError("train.tensorboard=true but the tensorboard package is not installed; "
                                      "pip install tensorboard, or set train.tensorboard=auto") from None

    def _rewrite_csv(self) -> None:
        for kind in ("train", "eval"):
            rows = [r for r in self._rows if r.get("kind") == kind]
            keys: list[str] = []
            for r in rows:
                keys += [k for k in r if k not in keys and k != "kind"]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
            write_text_atomic(self.out_dir / f"{kind}.csv", buf.getvalue())

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"kind": kind, "step": int(step), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._rows.append(row)
        path = self.out_dir / f"{kind}.csv"
        rows = [r for r in self._rows if r.get("kind") == kind]
        if len(rows) > 1 and list(rows[-1]) == list(rows[-2]):
            with open(path, "a", newline="") as f:  # same columns: append
                csv.DictWriter(f, fieldnames=[k for k in row if k != "kind"],
                               extrasaction="ignore").writerow(row)
        else:
            self._rewrite_csv()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
