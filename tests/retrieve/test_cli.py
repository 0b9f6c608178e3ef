"""``python -m incontext.bank``: build/add/remove/info in-process, ``search`` in a real subprocess (stdout purity)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from incontext.bank import main
from incontext.retrieve import PromptBank

from .conftest import FAST, write_source

REPO = Path(__file__).resolve().parents[2]


def _sets() -> list[str]:
    return [a for o in FAST for a in ("--set", o)]


def test_search_prints_exactly_k_lines(saved_bank, source_dir, capsys):
    query = source_dir / "green_dots" / "green_dots_2.jpg"
    assert main(["search", str(saved_bank), str(query), "--k", "1"]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 1 and out.out.split()[2] == "green_dots"
    k = 4  # and in a real process, where stdout must hold nothing but the K result lines
    out = subprocess.run([sys.executable, "-m", "incontext.bank", "search", str(saved_bank), str(query), "--k",
                          str(k)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == k
    for rank, line in enumerate(lines, 1):
        r, score, cls, src = line.split(" ", 3)
        assert int(r) == rank and -1.0 <= float(score) <= 1.0
        assert Path(src).is_file() and Path(src) != query
        if rank <= 3:  # the bank holds 3 other green_dots images
            assert cls == "green_dots"


def test_build_add_remove_info(tmp_path, capsys):
    src = write_source(tmp_path / "src", per_class=2)
    bank_dir = tmp_path / "bank"
    assert main(["build", str(src), str(bank_dir), "--quiet", "--no-cache", *_sets()]) == 0
    assert len(PromptBank.load(bank_dir)) == 6
    assert main(["build", str(src), str(tmp_path / "shard2"), "--quiet", "--no-cache", "--first-id", "1000",
                 *_sets()]) == 0
    assert PromptBank.load(tmp_path / "shard2").ids.tolist() == list(range(1000, 1006))
    more = write_source(tmp_path / "more", per_class=3)  # the first two per class are the same pixels
    assert main(["add", str(bank_dir), str(more / "red_stripes"), "--class", "red_stripes", "--quiet",
                 "--no-cache", "--copy"]) == 0
    bank = PromptBank.load(bank_dir)
    assert len(bank) == 9 and (bank_dir / "items").is_dir()
    assert main(["remove", str(bank_dir), "0", "1"]) == 0
    assert len(PromptBank.load(bank_dir)) == 7
    capsys.readouterr()
    assert main(["info", str(bank_dir)]) == 0
    info = capsys.readouterr().out
    assert "entries: 7" in info and "red_stripes (5)" in info and "blue_checks" not in info  # ids 0, 1 were its two


def test_errors_are_one_line_with_exit_code_2(tmp_path, saved_bank, source_dir, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bank: no folder") and err.count("\n") == 1
    q = str(source_dir / "red_stripes" / "red_stripes_0.jpg")
    assert main(["search", str(saved_bank), q, "--k", "50"]) == 2
    assert "offers only 11 entries" in capsys.readouterr().err
    assert main(["build", "no_such_dataset", str(tmp_path / "b")]) == 2
    assert "neither an existing folder nor a dataset" in capsys.readouterr().err
