"""Each standard loader on a tiny fake tree built here with the dataset's real layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from incontext.data.coco20i import Coco20i, fold_classes
from incontext.data.files import rle_decode, split_lines
from incontext.data.fss1000 import FSS1000
from incontext.data.folder import FolderBenchmark
from incontext.data.lvis92i import Lvis92i
from incontext.data.pascal5i import Pascal5i
from incontext.data.perseg import PerSeg
from incontext.errors import InputError


def _img(path: Path, h: int = 12, w: int = 16, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _mask(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    if palette:
        im = im.convert("P")
        im.putpalette([0, 0, 0, 128, 0, 0] + [0, 0, 0] * 254)
    im.save(path)


def _box(h: int = 12, w: int = 16, value: int = 1) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[3:9, 4:12] = value
    return m


def _check(bench, n: int = 3) -> list:
    out = []
    for i in range(n):
        s = bench[i]
        assert s.target.shape == s.episode.query.shape[:2]
        assert (s.target == 1).any()
        assert len(s.episode.supports) == bench.shots
        for sup in s.episode.supports:
            assert (sup.mask == 1).any() and sup.name != s.meta["query"]
        out.append(s)
    return out


def test_split_files_have_the_published_sizes():
    assert [len(split_lines(f"fss1000/{s}.txt")) for s in ("trn", "val", "test")] == [520, 240, 240]
    assert len(split_lines("pascal5i/val/fold0.txt")) == 346
    coco = split_lines("coco20i/val.txt.gz")
    assert len(coco) == 80 and coco[0].startswith("0\t")


def test_fss1000(tmp_path):
    for c in split_lines("fss1000/test.txt"):
        for n in (1, 2, 3):
            _img(tmp_path / c / f"{n}.jpg", seed=n)
            _mask(tmp_path / c / f"{n}.png", _box(value=255))
    b = FSS1000(root=str(tmp_path), shots=2)
    assert len(b) == 2400 and len(b.class_ids) == 240 and b.class_ids[0] == 760
    s = _check(b, 2)[0]
    assert s.meta["query"] == f"{sorted(split_lines('fss1000/test.txt'))[0]}/1.jpg"
    assert np.array_equal(FSS1000(root=str(tmp_path), shots=2)[1].target, b[1].target)
    with pytest.raises(InputError, match="benchmark.root"):
        FSS1000(root=str(tmp_path / "nowhere"))


def test_pascal5i(tmp_path):
    voc = tmp_path / "VOC2012"
    for line in split_lines("pascal5i/val/fold1.txt"):
        name, cls = line.split("__")
        _img(voc / "JPEGImages" / f"{name}.jpg")
        m = _box(value=int(cls))
        m[2, :] = 255  # a VOC border
        _mask(voc / "SegmentationClassAug" / f"{name}.png", m)
    b = Pascal5i(root=str(tmp_path), fold=1, shots=1, episodes=5)
    assert b.class_ids == [5, 6, 7, 8, 9]
    s = _check(b)[0]
    assert (s.target == 255).any() and set(np.unique(s.target)) == {0, 1, 255}
    with pytest.raises(InputError, match="fold"):
        Pascal5i(root=str(tmp_path), fold=4)


def test_coco20i_trn_from_masks_and_val_lists(tmp_path):
    for i, cls in enumerate([1, 2, 5, 1, 2]):  # class index 0-79; fold 0 tests 0, 4, 8, ...
        stem = f"COCO_train2014_{i:012d}"
        _img(tmp_path / "train2014" / f"{stem}.jpg", seed=i)
        _mask(tmp_path / "annotations" / "train2014" / f"{stem}.png", _box(value=cls + 1))
    (tmp_path / "val2014").mkdir()
    (tmp_path / "annotations" / "val2014").mkdir()
    trn = Coco20i(root=str(tmp_path), fold=0, split="trn", shots=1, episodes=4)
    assert sorted(trn.pool) == [1, 2] and len(trn.pool[1]) == 2  # class 5 has one image: no episode
    _check(trn, 2)
    val = Coco20i(root=str(tmp_path), fold=0, split="val", shots=1, episodes=4)
    assert sorted(val.pool) == fold_classes(0) and len(val.pool[0]) == 19217  # HSNet's person list
    # Images exist only for two classes here: keep those (the sampling and loading paths are the real ones).
    val.pool = {0: val.pool[0][:3], 4: val.pool[4][:2]}
    for items, cid in ((val.pool[0], 0), (val.pool[4], 4)):
        for j, item in enumerate(items):
            _img(tmp_path / item, seed=j)
            _mask(tmp_path / "annotations" / Path(item).with_suffix(".png"), _box(value=cid + 1))
    _check(val, 4)


def _rle_encode(mask: np.ndarray) -> bytes:
    """COCO's compressed RLE string (column-major runs), written independently of the decoder."""
    flat = mask.T.ravel().astype(np.uint8)
    runs, val, n = [], 0, 0
    for x in flat:
        if x != val:
            runs.append(n)
            val, n = x, 0
        n += 1
    runs.append(n)
    out = bytearray()
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(c + 48)
    return bytes(out)


def test_rle_decode_round_trip():
    rng = np.random.default_rng(0)
    m = rng.random((23, 31)) > 0.6
    m[:, :5] = True
    assert np.array_equal(rle_decode({"size": [23, 31], "counts": _rle_encode(m)}, 23, 31), m)
    assert np.array_equal(rle_decode({"size": [2, 2], "counts": [1, 2, 1]}, 2, 2), np.array([[0, 1], [1, 0]], bool))


def test_lvis92i(tmp_path):
    h, w = 12, 16
    box = _box(h, w).astype(bool)
    poly = [[4, 3, 12, 3, 12, 9, 4, 9]]
    anno = {}
    for cat in range(100, 125):  # 25 categories with 3 images each: 2 per fold for 1-shot
        anno[cat] = {}
        for j in range(3):
            name = f"val2017/{cat:06d}{j}.jpg"
            _img(tmp_path / "coco" / name, h, w, seed=j)
            segm = poly if j % 2 == 0 else {"size": [h, w], "counts": _rle_encode(box).decode()}
            anno[cat][name] = {"annotations": [{"segmentation": segm}]}
    for split in ("train", "val"):
        (tmp_path / f"lvis_{split}.pkl").write_bytes(pickle.dumps(anno))
    b = Lvis92i(root=str(tmp_path), fold=3, shots=1)
    assert len(b) == 2300 and b.order == [103, 113]  # every 10th category from the fold's offset
    s = _check(b, 3)[0]
    assert s.classes[0] == 103 and s.target.sum() >= box.sum() - 8
    (tmp_path / "lvis_val.pkl").write_bytes(pickle.dumps({"x": Path("evil")}))
    with pytest.raises(InputError, match="plain annotation pickle"):
        Lvis92i(root=str(tmp_path), fold=0)


def test_perseg(tmp_path):
    for obj in ("cat", "dog"):
        for j in range(3):
            _img(tmp_path / "Images" / obj / f"{j:02d}.jpg", seed=j)
            _mask(tmp_path / "Annotations" / obj / f"{j:02d}.png", _box(), palette=True)
    b = PerSeg(root=str(tmp_path))
    assert len(b) == 4  # 2 objects x 2 queries; 00 is the reference
    s = b[0]
    assert s.meta["query"] == "cat/01.jpg" and s.meta["supports"] == ["cat/00.jpg"]
    assert (s.target == 1).sum() == _box().sum()
    sh = PerSeg(root=str(tmp_path), supports="shuffled")[0]
    assert sh.meta["supports"] == ["dog/00.jpg"]


def test_folder(tmp_path):
    for c in ("apple", "pear"):
        for j in range(3):
            _img(tmp_path / c / f"im{j}.jpg", seed=j)
            _mask(tmp_path / c / f"im{j}.png", _box(value=255))
    _img(tmp_path / "pear" / "extra.png", seed=9)
    _mask(tmp_path / "pear" / "extra_mask.png", _box(value=1))
    _img(tmp_path / "single" / "a.jpg")
    _mask(tmp_path / "single" / "a.png", _box(value=255))
    b = FolderBenchmark(root=str(tmp_path), shots=2)
    assert len(b) == 7 and b.skipped == ["single"]
    s = _check(b, 7)
    assert {x.class_names[0] for x in s} == {"apple", "pear"}
    assert np.array_equal(FolderBenchmark(root=str(tmp_path), shots=2)[5].episode.supports[1].image,
                          s[5].episode.supports[1].image)
    with pytest.raises(InputError, match="class folders"):
        FolderBenchmark(root=str(tmp_path / "apple"))
