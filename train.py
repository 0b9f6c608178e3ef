"""Episodic training of any trainable stage (Hydra front end of ``incontext.train.loop``).

    python train.py experiment=painter_tiny                    # train, evaluate, checkpoint
    python train.py experiment=painter_tiny resume=true        # continue exactly where it stopped
    python train.py experiment=painter_tiny train.max_minutes=60 out_dir=runs/painter_60min
    torchrun --nproc_per_node=2 train.py experiment=painter_tiny   # DDP (gloo on CPU, NCCL on GPUs)

Config: ``configs/trainer.yaml`` (root) + ``configs/train/<name>.yaml`` (loop settings) +
``configs/experiment/<name>.yaml`` (task, data, evaluation, overrides). Checkpoints land in
``<out_dir>/checkpoints/{last,best}`` as Hugging Face folders (config.json + model.safetensors).
"""

from __future__ import annotations

import json
import os
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="configs", config_name="trainer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from incontext.train.loop import TrainConfig, train

    if cfg.task is None or cfg.data.train is None:
        sys.exit("train.py: no task/data configured; pick an experiment, e.g. `python train.py "
                 "experiment=painter_tiny` (configs/experiment/)")
    task = instantiate(cfg.task, _convert_="all")
    train_data = instantiate(cfg.data.train, _convert_="all")
    eval_data = instantiate(cfg.data.eval, _convert_="all") if cfg.data.get("eval") is not None else None
    evaluate_fn = instantiate(cfg.evaluate, _convert_="all") if cfg.get("evaluate") is not None else None
    loop_cfg = TrainConfig.from_dict(OmegaConf.to_container(cfg.train, resolve=True))
    summary = train(task, train_data, loop_cfg, cfg.out_dir, resume=bool(cfg.resume), eval_data=eval_data,
                    evaluate_fn=evaluate_fn, run_config=OmegaConf.to_container(cfg, resolve=True))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
