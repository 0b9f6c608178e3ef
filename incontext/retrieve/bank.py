"""The prompt bank: (image, mask, class) examples with embeddings, a FAISS index and a metadata table.

On disk a bank is a folder of versions written atomically and verified on load (``incontext.retrieve.store``;
the layout is described in ``prompts_bank/README.md``): a FAISS index over image-level vectors, the metadata
table (``meta.jsonl``), the entry ids and both vector arrays in one row order, and the embedder's config and
fitted statistics, with a manifest of sizes and SHA-256s. Images added as arrays (or with ``copy=True``) are
stored content-addressed under ``<bank>/items/``.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from incontext.errors import InputError
from incontext.retrieve.embed import (
    EmbeddingCache,
    EmbeddingSpec,
    FeatureEmbedder,
    build_embedder,
    raw_records,
)
from incontext.retrieve.index import IndexConfig, VectorIndex, normalize_rows
from incontext.retrieve.store import POINTER, CorruptBankError, corrupt, npy_bytes, open_version, write_version

__all__ = ["BankItem", "CorruptBankError", "Entry", "PromptBank", "folder_items"]

DEFAULT_CACHE = "~/.cache/incontext/embeddings"


@dataclass
class Entry:
    """One example in the bank.

    Attributes:
        id: stable int64 id (never reused after removal).
        cls: class name.
        image, mask: where to read the files: relative to the bank folder (copied items) or absolute.
        source: the original image file (or a dataset reference) the entry came from.
        image_sha1: ``content_hash`` of the decoded image pixels (a query with this hash is never returned).
        mask_sha1: ``content_hash`` of the image and the entry's 0/1 foreground.
        height, width: image size in pixels.
        fg: foreground fraction of the image.
        label: mask value that marks the object (0 = every non-zero value except 255).
        dataset, split: provenance (benchmark evaluation keeps test-split images out of the bank).
    """

    id: int
    cls: str
    image: str
    mask: str
    source: str
    image_sha1: str
    mask_sha1: str
    height: int
    width: int
    fg: float
    label: int = 0
    dataset: str = ""
    split: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Entry":
        d = dict(d)
        d["cls"] = d.pop("class")
        return cls(**d)


@dataclass
class BankItem:
    """An example to add: image and mask as paths or arrays ((H, W, 3) uint8, (H, W) labels), and its class.

    ``label`` picks one value of a multi-label mask (0 = all non-zero values except 255 form the object).
    """

    image: Any
    mask: Any
    cls: str
    source: str | None = None
    label: int = 0
    dataset: str = ""
    split: str = ""
    extra: dict = field(default_factory=dict)


def folder_items(source: str | os.PathLike, cls: str | None = None) -> list[BankItem]:
    """Items of a folder in the class-folder format ``<source>/<class>/<name>.jpg + <name>.png``.

    A folder that directly holds pairs (no class sub-folders) is one class named after the folder (or ``cls``).
    Pairs inside a class folder follow ``incontext.io.load_pairs_from_dir``.
    """
    from incontext.io import IMAGE_EXTENSIONS, load_pairs_from_dir

    root = Path(source).expanduser()
    if not root.is_dir():
        raise InputError(f"source: no folder at {root}; pass a folder laid out as <source>/<class>/<name>.jpg + "
                         "<name>.png, or a dataset name")
    direct = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
              and not p.name.startswith(".")]
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups: list[tuple[str, Path]] = []
    if direct:
        groups.append((cls or root.name, root))
    groups += [(cls or d.name, d) for d in subdirs]
    if not groups:
        raise InputError(f"source: {root} has no class folders and no image/mask pairs; expected "
                         "<source>/<class>/<name>.jpg + <name>.png")
    items = []
    for name, d in groups:
        for img, mask in load_pairs_from_dir(d):
            items.append(BankItem(image=img, mask=mask, cls=name, source=str(img.resolve())))
    return items


def _foreground(mask: np.ndarray, label: int) -> np.ndarray:
    return (mask == label) if label else ((mask > 0) & (mask != 255))


class PromptBank:
    """A bank of examples with a FAISS index. Create with :meth:`create`, open with :meth:`load`.

    Args:
        root: the bank folder.
        embedder: the embedding that computes its vectors.
        config: the retrieval config (``embedding``, ``index``, ``retriever`` sections; see
            ``configs/retrieval/default.yaml``), stored with the bank.
    """

    def __init__(self, root: str | os.PathLike, embedder: FeatureEmbedder, config: dict) -> None:
        self.root = Path(root).expanduser()
        self.embedder = embedder
        self.config = config
        self.index_cfg = IndexConfig(**dict(config.get("index") or {}))
        self.entries: list[Entry] = []
        self.ids = np.zeros(0, np.int64)
        self.image_vecs = np.zeros((0, 0), np.float32)
        self.object_vecs = np.zeros((0, 0), np.float32)
        self.index: VectorIndex | None = None
        self.next_id = 0
        self.version = ""
        self._rebuild_lookups()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, root: str | os.PathLike, config: dict | None = None, device: str = "cpu", first_id: int = 0
               ) -> "PromptBank":
        """A new, empty bank bound to ``root`` (nothing is written until :meth:`save`).

        ``first_id`` starts the id range (shards of one large bank use disjoint ranges, so their results can be
        merged by id). Refuses a folder that already holds a bank (use :meth:`load` and :meth:`add`)."""
        from incontext.retrieve.config import load_config

        root = Path(root).expanduser()
        if (root / POINTER).exists():
            raise InputError(f"bank: {root} already holds a prompt bank; use `add` to extend it or choose a new folder")
        cfg = config if config is not None else load_config("default")
        bank = cls(root, build_embedder(cfg["embedding"], device=device), cfg)
        if int(first_id) < 0:
            raise InputError(f"first_id: {first_id}; ids are non-negative int64")
        bank.next_id = int(first_id)
        return bank

    @classmethod
    def load(cls, root: str | os.PathLike, verify: str = "auto", device: str = "cpu", mmap: bool = True
             ) -> "PromptBank":
        """Open a saved bank after checking it is complete and consistent.

        Args:
            root: the bank folder.
            verify: ``"full"`` (sizes and SHA-256 of every file), ``"size"`` (sizes and counts only; still catches
                truncation) or ``"auto"`` (full below 2 GB of data).
            device: where the embedder's network runs.
            mmap: memory-map the stored vectors instead of reading them.

        Raises:
            CorruptBankError: the bank is incomplete or inconsistent; the message says what and how to fix it.
            InputError: no bank at ``root``.
        """
        root = Path(root).expanduser()
        vdir, manifest = open_version(root, verify)
        emb_doc = json.loads((vdir / "embedder.json").read_text())
        cfg = manifest["config"]
        embedder = build_embedder(emb_doc["config"], device=device)
        embedder.load_state(emb_doc["state"])
        bank = cls(root, embedder, cfg)
        spec = EmbeddingSpec.from_json(manifest["spec"])
        if embedder.spec != spec:
            raise CorruptBankError(corrupt(root, f"the stored embedder rebuilds as {embedder.spec} but the manifest "
                                                  f"records {spec} (incontext version or feature code changed)"))
        if "probe" in emb_doc:
            now = embedder.probe()
            before = np.asarray(emb_doc["probe"], np.float32)
            if now.shape != before.shape or float(now @ before) < 0.999:
                raise InputError(
                    f"bank {root}: the embedding code now computes different vectors than when the bank was built "
                    f"({spec.name}; probe cosine {float(now @ before) if now.shape == before.shape else 0:.4f}), "
                    f"so its stored vectors no longer match new queries; rebuild it with "
                    f"`python -m incontext.bank build <source> <new_dir> --config <its config>`"
                )
        mode = "r" if mmap else None
        bank.ids = np.load(vdir / "ids.npy", mmap_mode=mode)
        bank.image_vecs = np.load(vdir / "image_emb.npy", mmap_mode=mode)
        bank.object_vecs = np.load(vdir / "object_emb.npy", mmap_mode=mode)
        with open(vdir / "meta.jsonl", encoding="utf-8") as fh:
            bank.entries = [Entry.from_json(json.loads(line)) for line in fh if line.strip()]
        bank.index = VectorIndex.from_bytes((vdir / "index.faiss").read_bytes(), spec.image_dim,
                                            manifest["factory"], bank.index_cfg.nprobe, bank.index_cfg.ef_search,
                                            bank.index_cfg.k_factor)
        bank.next_id = int(manifest["next_id"])
        bank.version = vdir.name
        n = int(manifest["count"])
        checks = {"meta.jsonl lines": len(bank.entries), "ids.npy rows": len(bank.ids),
                  "image_emb.npy rows": len(bank.image_vecs), "object_emb.npy rows": len(bank.object_vecs),
                  "index vectors": bank.index.ntotal}
        for what, got in checks.items():
            if got != n:
                raise CorruptBankError(corrupt(root, f"{what} = {got} but the manifest counts {n} entries"))
        if bank.image_vecs.shape[1:] != (spec.image_dim,) or bank.object_vecs.shape[1:] != (spec.object_dim,):
            raise CorruptBankError(corrupt(root, "stored vector dimensions differ from the embedding spec"))
        meta_ids = np.array([e.id for e in bank.entries], np.int64)
        if not np.array_equal(meta_ids, np.asarray(bank.ids)):
            raise CorruptBankError(corrupt(root, "meta.jsonl and ids.npy list different entries"))
        idx_ids = bank.index.ids()
        if idx_ids is not None and not np.array_equal(np.sort(idx_ids), np.sort(meta_ids)):
            raise CorruptBankError(corrupt(root, "the FAISS index holds different ids from meta.jsonl"))
        bank._rebuild_lookups()
        return bank

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return len(self.entries)

    @property
    def spec(self) -> EmbeddingSpec:
        return self.embedder.spec

    @property
    def classes(self) -> list[str]:
        """Class names, sorted."""
        return sorted(self._by_class)

    def _rebuild_lookups(self) -> None:
        self._row = {e.id: r for r, e in enumerate(self.entries)}
        self._by_hash: dict[str, list[int]] = {}
        by_class: dict[str, list[int]] = {}
        for e in self.entries:
            self._by_hash.setdefault(e.image_sha1, []).append(e.id)
            by_class.setdefault(e.cls, []).append(e.id)
        self._by_class = {c: np.array(v, np.int64) for c, v in by_class.items()}
        self._prototypes: tuple[list[str], np.ndarray] | None = None

    def entry(self, id_: int) -> Entry:
        try:
            return self.entries[self._row[int(id_)]]
        except KeyError:
            raise InputError(f"bank: no entry with id {id_} in {self.root}; `info` lists the id range") from None

    def rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions (into the vector arrays) of entry ``ids``."""
        return np.array([self._row[int(i)] for i in ids], np.int64)

    def ids_with_hash(self, sha1: str) -> list[int]:
        """Ids of entries whose image has this ``content_hash``."""
        return list(self._by_hash.get(sha1, []))

    def class_ids(self, cls: str) -> np.ndarray:
        """Ids of one class (InputError naming near matches when unknown)."""
        if cls not in self._by_class:
            near = difflib.get_close_matches(str(cls), self.classes, n=3)
            hint = f"did you mean {', '.join(near)}? " if near else ""
            raise InputError(f"class: {cls!r} is not in the bank {self.root}; {hint}"
                             f"it has {len(self._by_class)} classes (see `python -m incontext.bank info`)")
        return self._by_class[cls]

    def class_prototypes(self) -> tuple[list[str], np.ndarray]:
        """Class names and (K, object_dim) unit mean object vectors, one per class."""
        if self._prototypes is None:
            names = self.classes
            protos = np.stack([np.asarray(self.object_vecs[self.rows(self._by_class[c])]).mean(0) for c in names]) \
                if names else np.zeros((0, self.spec.object_dim), np.float32)
            self._prototypes = (names, normalize_rows(protos) if len(names) else protos)
        return self._prototypes

    # ------------------------------------------------------------------ adding and removing
    def add(
        self,
        items: Iterable[BankItem],
        *,
        total: int | None = None,
        copy: bool = False,
        cache: str | os.PathLike | None | bool = True,
        progress: bool = True,
        fit_size: int = 10_000,
    ) -> list[int]:
        """Embed and add items; returns their new ids (skipped items — empty masks — get none).

        The first add of a new bank fits the embedding statistics on its first ``fit_size`` items and builds
        (and, for IVF/PQ, trains) the index; later adds reuse both. Call :meth:`save` to write the bank.

        Args:
            items: ``BankItem``s (see ``folder_items``).
            total: number of items, for the progress bar and ``index.factory=auto``.
            copy: copy image and mask files into ``<bank>/items/`` (arrays are always stored there).
            cache: embedding cache folder; True = the config's ``cache_dir``; False/None = no cache.
            progress: progress bar on stderr.
        """
        if isinstance(items, Sequence) and total is None:
            total = len(items)
        cache_obj = self._cache(cache)
        pending: list[tuple[Entry, dict]] = []
        new_entries: list[Entry] = []
        img_parts: list[np.ndarray] = []
        obj_parts: list[np.ndarray] = []
        skipped: list[str] = []

        def emit(batch: list[tuple[Entry, dict]]) -> None:
            recs = [r for _, r in batch]
            iv = self.embedder.image_vectors(recs)
            ov = self.embedder.object_vectors(recs)
            for (e, _), o in zip(batch, ov):
                if not np.isfinite(o).all():
                    skipped.append(e.source)
            keep = np.isfinite(ov).all(1)
            for (e, _), k in zip(batch, keep):
                if k:
                    e.id = self.next_id
                    self.next_id += 1
                    new_entries.append(e)
            img_parts.append(iv[keep])
            obj_parts.append(ov[keep])

        loaded = ((img, fg, entry) for entry, img, fg in self._load_items(items, copy))
        for rec, entry in raw_records(self.embedder, loaded, total, cache_obj, progress, desc="bank add"):
            pending.append((entry, rec))
            if not self.embedder.fitted:
                if len(pending) < fit_size:
                    continue
                self.embedder.fit([r for _, r in pending])
            if len(pending) >= 1024:
                emit(pending)
                pending = []
        if pending:
            if not self.embedder.fitted:
                self.embedder.fit([r for _, r in pending])
            emit(pending)
        if skipped:
            print(f"bank: skipped {len(skipped)} item(s) whose mask marks no object: {', '.join(skipped[:5])}"
                  + (" ..." if len(skipped) > 5 else ""), file=sys.stderr)
        if not new_entries:
            return []
        iv = np.concatenate(img_parts)
        ov = np.concatenate(obj_parts)
        ids = np.array([e.id for e in new_entries], np.int64)
        if self.index is None:
            factory = self.index_cfg.resolve(len(ids) if total is None else max(total, len(ids)))
            self.index = VectorIndex(iv.shape[1], factory, self.index_cfg.nprobe, self.index_cfg.ef_search,
                                     train_iters=self.index_cfg.train_iters, k_factor=self.index_cfg.k_factor)
            self.index.train(iv, self.index_cfg.train_size)
        self.index.add(iv, ids)
        self.entries = self.entries + new_entries
        self.ids = np.concatenate([np.asarray(self.ids), ids])
        self.image_vecs = np.concatenate([np.asarray(self.image_vecs).reshape(-1, iv.shape[1]), iv])
        self.object_vecs = np.concatenate([np.asarray(self.object_vecs).reshape(-1, ov.shape[1]), ov])
        self._rebuild_lookups()
        return ids.tolist()

    def _cache(self, cache: Any) -> EmbeddingCache | None:
        if cache is True:
            cache = self.config.get("cache_dir", DEFAULT_CACHE)
        if not cache:
            return None
        return EmbeddingCache(cache)

    def _load_items(self, items: Iterable[BankItem], copy: bool) -> Iterable[tuple[Entry, np.ndarray, np.ndarray]]:
        from incontext.io import check_mask_matches_image, read_image, read_mask

        from incontext.retrieve.embed import content_hash

        for i, it in enumerate(items):
            what = it.source or (str(it.image) if isinstance(it.image, (str, os.PathLike)) else f"item {i}")
            img = read_image(it.image, name=f"{what}: image")
            mask = check_mask_matches_image(read_mask(it.mask, name=f"{what}: mask"), img, name=what)
            fg = _foreground(mask, int(it.label)).astype(np.uint8)
            ih = content_hash(img)
            mh = content_hash(img, fg)
            img_path, mask_path, referenced = self._store_files(it, img, fg, ih, mh, copy)
            # A referenced original mask may hold several labels, so the entry keeps which one is its object;
            # stored copies are already 0/1.
            entry = Entry(id=-1, cls=str(it.cls), image=img_path, mask=mask_path, source=str(what),
                          image_sha1=ih, mask_sha1=mh, height=int(img.shape[0]), width=int(img.shape[1]),
                          fg=float(fg.mean()), label=int(it.label) if referenced else 0,
                          dataset=it.dataset, split=it.split)
            yield entry, img, fg

    def _store_files(self, it: BankItem, img: np.ndarray, fg: np.ndarray, ih: str, mh: str, copy: bool
                     ) -> tuple[str, str, bool]:
        """Paths to record for an item, and whether they reference the user's original files."""
        from incontext.io import atomic_path, write_mask_png

        is_path = isinstance(it.image, (str, os.PathLike)) and isinstance(it.mask, (str, os.PathLike))
        if is_path and not copy:
            return str(Path(it.image).expanduser().resolve()), str(Path(it.mask).expanduser().resolve()), True
        d = self.root / "items" / ih[:2]
        d.mkdir(parents=True, exist_ok=True)
        ipath, mpath = d / f"{ih}.png", d / f"{mh}_mask.png"
        if not ipath.exists():  # content-addressed: an existing file already holds these pixels
            from PIL import Image

            with atomic_path(ipath) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
        if not mpath.exists():
            write_mask_png(mpath, fg)
        return str(ipath.relative_to(self.root)), str(mpath.relative_to(self.root)), False

    def remove(self, ids: Sequence[int]) -> int:
        """Remove entries by id; returns how many were removed. Unknown ids raise ``InputError``."""
        ids = np.unique(np.asarray(list(ids), np.int64))
        for i in ids:
            self.entry(int(i))
        if not len(ids) or self.index is None:
            return 0
        keep = ~np.isin(np.asarray(self.ids), ids)
        if not self.index.remove(ids):  # HNSW cannot remove: rebuild from the stored vectors
            fresh = self.index.empty_like()
            fresh.add(np.asarray(self.image_vecs)[keep], np.asarray(self.ids)[keep])
            self.index = fresh
        self.entries = [e for e, k in zip(self.entries, keep) if k]
        self.ids = np.asarray(self.ids)[keep]
        self.image_vecs = np.asarray(self.image_vecs)[keep]
        self.object_vecs = np.asarray(self.object_vecs)[keep]
        self._rebuild_lookups()
        return int(len(ids))

    # ------------------------------------------------------------------ search
    def search(
        self,
        vectors: np.ndarray,
        k: int,
        *,
        spec: EmbeddingSpec,
        classes: Sequence[str] | None = None,
        exclude_ids: Iterable[int] = (),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entries by cosine of image-level vectors.

        Args:
            vectors: (D,) or (Q, D) query vectors (normalised here).
            k: results per query.
            spec: the embedding that produced ``vectors``; must equal the bank's (else ``InputError``).
            classes: restrict to these classes.
            exclude_ids: never return these ids (e.g. entries with the query's content hash).

        Returns:
            scores (Q, k) float32 descending and ids (Q, k) int64; -inf / -1 where fewer than k exist.
        """
        self.spec.check(spec)
        q = normalize_rows(np.atleast_2d(vectors))
        if q.shape[1] != self.spec.image_dim:
            raise InputError(f"vectors: dimension {q.shape[1]}, the bank's is {self.spec.image_dim}")
        k = int(k)
        if k < 1:
            raise InputError(f"k: {k}; ask for at least one neighbour")
        excl = np.asarray(sorted(set(int(i) for i in exclude_ids)), np.int64)
        allowed = None
        if classes is not None:
            allowed = np.unique(np.concatenate([self.class_ids(c) for c in classes])) if classes else \
                np.zeros(0, np.int64)
        if len(self) == 0 or (allowed is not None and not len(allowed)):
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        fetch = k + len(excl)
        if allowed is not None and len(allowed) <= self.index_cfg.exact_subset_max:
            allowed = np.setdiff1d(allowed, excl)
            vecs = np.asarray(self.image_vecs)[self.rows(allowed)]
            sims = q @ vecs.T
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(sims, order, 1).astype(np.float32)
            ids = allowed[order]
        else:
            scores, ids = self.index.search(q, min(fetch, max(1, len(self))), allowed)
            if len(excl):
                bad = np.isin(ids, excl)
                scores = np.where(bad, -np.inf, scores)
                order = np.argsort(-scores, axis=1, kind="stable")
                scores = np.take_along_axis(scores, order, 1)
                ids = np.where(np.isneginf(scores), -1, np.take_along_axis(ids, order, 1))
            scores, ids = scores[:, :k], ids[:, :k]
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores.astype(np.float32), ids.astype(np.int64)

    # ------------------------------------------------------------------ reading entries
    def path(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root / p

    def support(self, id_: int, verify: bool = True) -> Any:
        """The entry as a ``Support`` with a 0/1 mask, named ``bank:<class>/<file>``.

        With ``verify``, the image's pixels must still hash to the value recorded when it was added (a file
        changed since would no longer match its vectors)."""
        from incontext.episode import Support
        from incontext.io import read_image, read_mask

        from incontext.retrieve.embed import content_hash

        e = self.entry(id_)
        img = read_image(self.path(e.image), name=f"bank entry {e.id} image")
        if verify and content_hash(img) != e.image_sha1:
            raise InputError(
                f"bank entry {e.id}: {self.path(e.image)} changed since it was added to {self.root}; remove the "
                "entry and add the file again (or rebuild the bank)"
            )
        mask = read_mask(self.path(e.mask), name=f"bank entry {e.id} mask")
        fg = _foreground(mask, e.label).astype(np.uint8)
        return Support.from_arrays(img, fg, name=f"bank:{e.cls}/{Path(e.source).name}")

    def info(self) -> dict:
        """Summary: size, classes, embedding, index."""
        counts = {c: int(len(v)) for c, v in self._by_class.items()}
        return {
            "root": str(self.root),
            "version": self.version,
            "entries": len(self),
            "classes": len(counts),
            "per_class": dict(sorted(counts.items())),
            "embedding": self.spec.to_json() if self.embedder.fitted else None,
            "index": {"factory": self.index.factory if self.index else None,
                      "kind": self.index.kind if self.index else None,
                      "nprobe": self.index_cfg.nprobe, "ef_search": self.index_cfg.ef_search},
            "id_range": [int(np.min(self.ids)), int(np.max(self.ids))] if len(self) else None,
            "next_id": self.next_id,
        }

    # ------------------------------------------------------------------ saving
    def save(self) -> Path:
        """Write the bank atomically as a new version (see ``incontext.retrieve.store``); returns its folder."""
        if self.index is None or not self.embedder.fitted:
            raise InputError(f"bank: nothing to save at {self.root}; add at least one example first")
        meta = "".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in self.entries).encode()
        blobs = {
            "index.faiss": self.index.to_bytes(),
            "meta.jsonl": meta,
            "ids.npy": npy_bytes(np.asarray(self.ids, np.int64)),
            "image_emb.npy": npy_bytes(np.asarray(self.image_vecs, np.float32)),
            "object_emb.npy": npy_bytes(np.asarray(self.object_vecs, np.float32)),
            "embedder.json": json.dumps({"config": self.embedder.config, "state": self.embedder.state_dict(),
                                         "probe": np.round(self.embedder.probe(), 6).tolist()}, indent=1).encode(),
        }
        manifest = {"count": len(self), "next_id": self.next_id, "spec": self.spec.to_json(),
                    "factory": self.index.factory, "config": self.config, "classes": len(self._by_class)}
        final = write_version(self.root, blobs, manifest, keep=self.version)
        self.version = final.name
        return final
