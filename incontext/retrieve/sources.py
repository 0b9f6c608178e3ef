"""Where bank items come from: a folder in the class-folder format, or a named dataset.

Dataset sources (``name[:split]``):

* ``synthetic`` / ``synthetic:test`` / ``synthetic:train`` — the procedural benchmark
  (``incontext.data.synthetic``): ``per_class`` images of each class of the split, one target class per image,
  drawn from a bank-only random stream (``BANK_STREAM``) so they are never the images an evaluation episode
  draws as queries. Its splits are class-disjoint, so a bank for evaluating ``synthetic:test`` episodes holds
  *other images of the test classes* — the synthetic counterpart of a pool of training images.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from incontext.errors import InputError
from incontext.retrieve.bank import BankItem, folder_items

__all__ = ["BANK_STREAM", "DATASETS", "source_items", "synthetic_items"]

# Random stream of bank images, distinct from the episode streams (query 0, supports 1, shuffle 2) of
# incontext.data.base.
BANK_STREAM = 7


def synthetic_items(
    split: str = "test", per_class: int = 5, size: int = 224, seed: int = 0, limit: int | None = None,
    classes: list[int] | None = None, max_classes: int | None = None,
) -> tuple[Iterator[BankItem], int]:
    """``per_class`` rendered images of each class of ``split`` (or of ``classes``; only the first
    ``max_classes``, evenly spaced over the split's list so that they cover different appearances, when
    given): a lazy iterator and its length. Images are drawn shot-major (every class once,
    then again), so ``limit`` keeps classes balanced."""
    from incontext.data.base import episode_rng, split_key
    from incontext.data.synthetic import SceneRenderer, class_table

    if int(per_class) < 1:
        raise InputError(f"per_class: {per_class}; pass 1 or more")
    renderer = SceneRenderer(split, size)
    table = class_table()
    ids = [c.id for c in renderer.classes] if classes is None else list(classes)
    if max_classes and max_classes < len(ids):
        ids = [ids[int(round(j))] for j in np.linspace(0, len(ids) - 1, int(max_classes))]
    key = split_key(f"synthetic/{split}/bank")
    total = per_class * len(ids) if limit is None else min(int(limit), per_class * len(ids))

    def gen() -> Iterator[BankItem]:
        n = 0
        for j in range(per_class):
            for cid in ids:
                if n >= total:
                    return
                sc = renderer.scene(episode_rng(seed, key, cid, BANK_STREAM, j), [cid])
                mask = (sc.labels > 0).astype(np.uint8)
                name = table[cid].name
                yield BankItem(image=sc.image, mask=mask, cls=name, source=f"synthetic:{split}:{name}:{j}",
                               dataset="synthetic", split=split)
                n += 1

    return gen(), total


DATASETS = {"synthetic": synthetic_items}


def source_items(
    source: str | os.PathLike, cls: str | None = None, split: str | None = None, limit: int | None = None,
    **dataset_kwargs,
) -> tuple[Iterable[BankItem], int]:
    """Items of ``source`` and how many: an existing folder (class-folder format) or ``dataset[:split]``
    (``dataset_kwargs`` such as ``per_class``, ``size``, ``seed`` go to the dataset)."""
    p = Path(source).expanduser()
    if p.exists():
        items = folder_items(p, cls=cls)
        items = items[:limit] if limit is not None else items
        return items, len(items)
    name, _, sp = str(source).partition(":")
    if name in DATASETS:
        kwargs = dict(dataset_kwargs)
        if sp or split:
            kwargs["split"] = split or sp
        return DATASETS[name](limit=limit, **kwargs)
    raise InputError(
        f"source: {source!r} is neither an existing folder nor a dataset name; pass a folder laid out as "
        f"<source>/<class>/<name>.jpg + <name>.png, or one of: {', '.join(f'{d}[:split]' for d in DATASETS)}"
    )
