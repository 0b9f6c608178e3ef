"""The protocol a trainable stage implements so ``train.py`` can train it, and where tasks are registered.

A task owns everything stage-specific — the model, how one training item becomes tensors (colouring, masking,
augmentation), the loss, how weights are saved, and how the live model is wrapped as a ``Segmenter`` for the
periodic evaluation. The loop (``incontext.train.loop``) owns the rest: data order, optimiser, schedule,
precision, accumulation, clipping, DDP, evaluation cadence, checkpoints and logs.

Randomness contract (what makes ``resume=true`` exact): ``make_sample`` draws only from the ``rng`` it is
given (seeded by the loop from (seed, item index)); ``loss`` may use torch's global generator (dropout, random
masks on device), which the loop reseeds from (seed, step, rank, micro-step) before each call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from incontext.pipeline import Segmenter
    from incontext.train.data import TrainItem

__all__ = ["TrainTask", "TASKS", "task_target"]


@runtime_checkable
class TrainTask(Protocol):
    """What ``train.py`` needs from a trainable stage."""

    name: str

    def build_model(self) -> torch.nn.Module:
        """A fresh model (random init or ``init_checkpoint``). The loop seeds torch before calling."""
        ...

    def make_sample(self, item: "TrainItem", rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One training item -> a dict of equally shaped tensors (no batch dim), stacked by the loop."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Scalar loss of a batch, averaged over its samples (so DDP / accumulation averages agree), and a dict
        of floats to log."""
        ...

    def save_pretrained(self, model: torch.nn.Module, directory: Path) -> None:
        """Write the model's weights to ``directory`` in the Hugging Face layout (config.json +
        model.safetensors) so ``huggingface_hub`` can publish it and the stage can load it."""
        ...

    def segmenter(self, model: torch.nn.Module, device: torch.device) -> "Segmenter":
        """The live ``model`` wrapped as the method users run (for the periodic evaluation)."""
        ...


# One visible registry of trainable stages (name -> class). ``train.py`` configs name the class with
# ``task._target_``; this table is for listing and for error messages.
TASKS: dict[str, str] = {
    "painter": "incontext.generate.painter_task.PainterTask",
    "patch_encoder": "incontext.features.learned_task.PatchEncoderTask",
    "sam": "incontext.train.sam_task.SamTask",
    "vrp": "incontext.refine.vrp_task.VrpTask",
}


def task_target(name: str) -> str:
    """The import path of a registered task."""
    if name not in TASKS:
        raise KeyError(f"task: unknown {name!r}; registered: {', '.join(sorted(TASKS))}")
    return TASKS[name]
