"""Command line for prompt banks: ``python -m incontext.bank build|add|remove|info|search|concepts``.

    python -m incontext.bank build <source> <bank_dir> [--config default] [--set index.factory=HNSW32] [--copy]
    python -m incontext.bank add <bank_dir> <source> [--copy]
    python -m incontext.bank remove <bank_dir> <id> [<id> ...]
    python -m incontext.bank info <bank_dir> [--json]
    python -m incontext.bank search <bank_dir> <query_image> [--k K] [--class C] [--mmr 0.7]
    python -m incontext.bank concepts <bank_dir> <query_image> [--top N]

``<source>`` is a folder in the class-folder format (``<source>/<class>/<name>.jpg`` + ``<name>.png``) or a
dataset name (``synthetic``, ``synthetic:test``; see ``incontext.retrieve.sources``). ``search`` prints exactly
K lines ``rank score class source_file`` to stdout; every message and progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from incontext.errors import InputError

__all__ = ["main"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--copy", action="store_true",
                   help="copy images and masks into <bank_dir>/items (default: reference the source files)")
    p.add_argument("--class", dest="cls", default=None,
                   help="class name for a folder that directly holds pairs (default: the folder's name)")
    p.add_argument("--split", default=None, help="dataset split for a dataset source (default: the dataset's)")
    p.add_argument("--limit", type=int, default=None, help="at most this many items")
    p.add_argument("--per-class", type=int, default=5, help="images per class from a dataset source")
    p.add_argument("--size", type=int, default=224, help="image side for a rendered dataset source")
    p.add_argument("--seed", type=int, default=0, help="seed for a rendered dataset source")
    p.add_argument("--max-classes", type=int, default=None, help="only N classes (evenly spaced) of a dataset source")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m incontext.bank", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="where embedding networks run")
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="create a bank from a folder of pairs or a dataset")
    b.add_argument("source")
    b.add_argument("bank_dir")
    b.add_argument("--config", default="default", help="retrieval config name (configs/retrieval) or YAML path")
    b.add_argument("--first-id", type=int, default=0, help="first entry id (disjoint ranges for shards)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. index.factory=HNSW32 (repeatable)")
    _add_source_args(b)

    a = sub.add_parser("add", help="add a folder of pairs or a dataset to an existing bank")
    a.add_argument("bank_dir")
    a.add_argument("source")
    _add_source_args(a)

    r = sub.add_parser("remove", help="remove entries by id")
    r.add_argument("bank_dir")
    r.add_argument("ids", nargs="+", type=int)

    i = sub.add_parser("info", help="summarise a bank")
    i.add_argument("bank_dir")
    i.add_argument("--json", action="store_true", help="print the full summary as JSON")

    s = sub.add_parser("search", help="print the K best entries for a query image")
    s.add_argument("bank_dir")
    s.add_argument("query_image")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--class", dest="classes", action="append", default=None,
                   help="restrict to this class (repeatable)")
    s.add_argument("--mmr", type=float, default=None, help="diversify with maximal marginal relevance (lambda)")
    s.add_argument("--rerank-weight", type=float, default=None, help="override the bank's re-ranking weight")

    c = sub.add_parser("concepts", help="rank the bank's classes for a query image")
    c.add_argument("bank_dir")
    c.add_argument("query_image")
    c.add_argument("--top", type=int, default=None)
    return ap


def _add(bank, args: argparse.Namespace) -> list[int]:
    from pathlib import Path

    from incontext.retrieve.sources import source_items

    extra = {} if Path(args.source).expanduser().exists() else \
        {"per_class": args.per_class, "size": args.size, "seed": args.seed, "max_classes": args.max_classes}
    items, total = source_items(args.source, cls=args.cls, split=args.split, limit=args.limit, **extra)
    _log(f"bank: embedding {total} item(s) from {args.source}")
    return bank.add(items, total=total, copy=args.copy, cache=not args.no_cache, progress=not args.quiet)


def _run(args: argparse.Namespace) -> int:
    from incontext.retrieve import PromptBank, Retriever, load_config

    if args.cmd == "build":
        cfg = load_config(args.config, args.overrides)
        bank = PromptBank.create(args.bank_dir, cfg, device=args.device, first_id=args.first_id)
        ids = _add(bank, args)
        if not ids:
            raise InputError(f"source: {args.source} gave no usable example (every mask empty?)")
        bank.save()
        _log(f"bank: built {bank.root} with {len(bank)} entries in {len(bank.classes)} classes "
             f"({bank.spec.name}, index {bank.index.factory})")
    elif args.cmd == "add":
        bank = PromptBank.load(args.bank_dir, device=args.device)
        ids = _add(bank, args)
        bank.save()
        _log(f"bank: added {len(ids)} entries (ids {ids[0]}..{ids[-1]}) -> {len(bank)} total" if ids
             else "bank: nothing added")
    elif args.cmd == "remove":
        bank = PromptBank.load(args.bank_dir, device=args.device)
        n = bank.remove(args.ids)
        bank.save()
        _log(f"bank: removed {n} entries -> {len(bank)} total")
    elif args.cmd == "info":
        info = PromptBank.load(args.bank_dir, device=args.device).info()
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            per = info.pop("per_class")
            for key, value in info.items():
                print(f"{key}: {value}")
            shown = ", ".join(f"{c} ({n})" for c, n in list(per.items())[:20])
            print(f"per_class: {shown}" + (" ..." if len(per) > 20 else ""))
    elif args.cmd == "search":
        if args.k < 1:
            raise InputError(f"--k: {args.k}; ask for at least one neighbour")
        bank = PromptBank.load(args.bank_dir, device=args.device)
        settings = dict(bank.config.get("retriever") or {})
        if args.mmr is not None:
            settings["mmr_lambda"] = args.mmr
        if args.rerank_weight is not None:
            settings["rerank_weight"] = args.rerank_weight
        retriever = Retriever(bank, **settings)
        hits = retriever.search(args.query_image, args.k, classes=args.classes)
        if len(hits) < args.k:
            pool = "the requested classes" if args.classes else "the bank"
            raise InputError(f"--k: {args.k} but {pool} offers only {len(hits)} entries other than the query; "
                             f"pass --k {len(hits)} or fewer")
        for rank, h in enumerate(hits, 1):
            print(f"{rank} {h.score:.4f} {h.cls} {h.source}")
    elif args.cmd == "concepts":
        bank = PromptBank.load(args.bank_dir, device=args.device)
        retriever = Retriever(bank, **dict(bank.config.get("retriever") or {}))
        for rank, c in enumerate(retriever.rank_concepts(args.query_image, top=args.top), 1):
            print(f"{rank} {c.score:.4f} {c.cls} {c.entries}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
