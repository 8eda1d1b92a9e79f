"""Every number in a results table appears in the results file the table cites.

Which tables are results tables: every Markdown table in docs/results.md; every table in README.md or
docs/*.md under a heading whose text contains "Results" (down to the next heading of the same or a higher
level); and every table anywhere in those files that cites a source.

How a table cites its source: the first non-blank line after the table's last row reads

    Source: `benchmarks/results/<study>/<file>`, `benchmarks/results/<study>/<other file>` ...

naming one or more files under benchmarks/results/ (a name may hold a ``*`` glob matching at least one
file). A results table that shows numbers and cites no existing file fails.

Which numbers are checked: those of the body rows (the header row holds labels); text inside backticks
(option names, commands, file names) and tokens joined to letters (``3x512``, ``K4``, ``h200``) are
labels, not numbers.

When a number matches: a number T shown in the table with d decimals matches a number F found anywhere in
the cited files' text when F, as the table shows it, rounds to T: ``|F' - T| <= 0.5 * 10**-d`` (plus
1e-9 for binary floats), where F' is
  - F, or 100 F, when T carries ``%`` (files hold rates as fractions or as percent);
  - F / 1e3 for a ``k`` suffix, F / 1e6 for an ``M`` suffix (``20.3k``, ``0.66M``);
  - F or F / 60 for ``min`` (files hold seconds);
  - F itself otherwise (``s``, ``ms`` and bare numbers are in the file's units).
Signs count: ``-252`` needs a negative number in the file, ``+28`` a positive one.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RESULTS_PAGE = REPO / "docs" / "results.md"

HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
SEPARATOR = re.compile(r"^\s*\|(\s*:?-+:?\s*\|)+\s*$")
SOURCE = re.compile(r"^\s*Sources?:\s*(.+)$")
CITED = re.compile(r"benchmarks/results/[\w./*-]+")
CODE = re.compile(r"`[^`]*`")
# a number not joined to letters, digits or dots on either side, with its sign and its unit
TABLE_NUMBER = re.compile(r"(?<![\w.])([+\-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%|k|M| ?min)?(?![\w.%])")
# in a file, "1071-2054s" is two numbers: a minus joined to a digit or letter before it is no sign
FILE_NUMBER = re.compile(r"(?:(?<![\w.])-)?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
SCALES = {"%": (1.0, 100.0), "k": (1e-3,), "M": (1e-6,), "min": (1.0, 1 / 60), "": (1.0,)}


@dataclass
class Table:
    document: Path
    line: int  # 1-based line of the header row
    rows: list[str]  # body rows
    section: str  # the headings above it, outermost first
    sources: list[Path] = field(default_factory=list)
    cited: list[str] = field(default_factory=list)  # the names as written, globs unexpanded

    def where(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line} ({self.section or 'no heading'})"


def tables(document: Path, root: Path = REPO) -> list[Table]:
    """The Markdown tables of ``document`` with their citations (see the module docstring), cited paths
    taken from ``root``."""
    lines = document.read_text(encoding="utf-8").splitlines()
    found: list[Table] = []
    headings: list[tuple[int, str]] = []
    in_code = False
    i = 0
    while i < len(lines):
        text = lines[i]
        if text.lstrip().startswith("```"):
            in_code = not in_code
        heading = None if in_code else HEADING.match(text)
        if heading:
            level = len(heading.group(1))
            headings = [h for h in headings if h[0] < level] + [(level, heading.group(2).strip())]
        if in_code or not (TABLE_ROW.match(text) and i + 1 < len(lines) and SEPARATOR.match(lines[i + 1])):
            i += 1
            continue
        start, i = i, i + 2
        rows = []
        while i < len(lines) and TABLE_ROW.match(lines[i]):
            rows.append(lines[i])
            i += 1
        table = Table(document, start + 1, rows, " > ".join(h[1] for h in headings))
        after = i
        while after < len(lines) and not lines[after].strip():
            after += 1
        cite = SOURCE.match(lines[after]) if after < len(lines) else None
        if cite:
            table.cited = CITED.findall(cite.group(1))
            table.sources = sorted({p for name in table.cited for p in root.glob(name) if p.is_file()})
        found.append(table)
    return found


def is_results_table(table: Table) -> bool:
    return (table.document == RESULTS_PAGE or "results" in table.section.lower() or bool(table.cited))


def table_numbers(row: str) -> list[tuple[str, float, int, str]]:
    """(as shown, value, decimals, unit) of every number in a body row, outside backticks."""
    cells = CODE.sub(" ", row).strip().strip("|")
    out = []
    for m in TABLE_NUMBER.finditer(cells):
        sign, whole, frac, unit = m.group(1), m.group(2).replace(",", ""), m.group(3) or "", (m.group(4) or "")
        value = float(whole + frac) * (-1 if sign in ("-", "−") else 1)
        out.append((m.group(0).strip(), value, max(len(frac) - 1, 0), unit.strip()))
    return out


def file_numbers(paths: list[Path]) -> list[float]:
    values = {float(v) for p in paths for v in FILE_NUMBER.findall(p.read_text(encoding="utf-8", errors="replace"))}
    return sorted(v for v in values if math.isfinite(v))


def appears(value: float, decimals: int, unit: str, numbers: list[float]) -> bool:
    """Whether some file number, scaled as the table shows it (``SCALES``), rounds to ``value``."""
    half = 0.5 * 10.0 ** -decimals + 1e-9
    for scale in SCALES[unit]:
        lo, hi = sorted(((value - half) / scale, (value + half) / scale))
        j = bisect.bisect_left(numbers, lo)
        if j < len(numbers) and numbers[j] <= hi:
            return True
    return False


def all_results_tables() -> list[Table]:
    return [t for doc in DOCUMENTS if doc.is_file() for t in tables(doc) if is_results_table(t)]


def test_the_table_parser_reads_citations_sections_and_numbers(tmp_path: Path) -> None:
    study = tmp_path / "benchmarks" / "results" / "study"
    study.mkdir(parents=True)
    (study / "run_after.json").write_text('{"return": 3222.9}')
    (study / "run_after.log").write_text("return 3222.9")
    page = tmp_path / "page.md"
    page.write_text("# Results\n\n| seed | return |\n|---|---|\n| 0 | 3223 ± 3.4 |\n| `3x512` | 99.2% |\n\n"
                    "Source: `benchmarks/results/study/*after.json`\n\n## Options\n\n| key | meaning |\n"
                    "|---|---|\n| `train.k` | 4 steps |\n\n```\n| not | a table |\n|---|---|\n```\n")
    results, options = tables(page, tmp_path)
    assert results.section == "Results" and options.section == "Results > Options"
    assert results.cited == ["benchmarks/results/study/*after.json"] and results.sources == [study / "run_after.json"]
    assert not options.cited and options.rows == ["| `train.k` | 4 steps |"]
    assert [n[:4] for n in table_numbers(results.rows[0])] == [("0", 0.0, 0, ""), ("3223", 3223.0, 0, ""),
                                                              ("3.4", 3.4, 1, "")]
    assert [n[:4] for n in table_numbers(results.rows[1])] == [("99.2%", 99.2, 1, "%")]
    assert [n[0] for n in table_numbers("| h200 | 1603 -> 3223 | -252 ± 29 | 20.3k | 0.66M | 5.1 min | 10,000 |")] == [
        "1603", "3223", "-252", "29", "20.3k", "0.66M", "5.1 min", "10,000"]


def test_a_number_matches_when_the_file_value_rounds_to_it(tmp_path: Path) -> None:
    (tmp_path / "report.txt").write_text("wall 1071-2054s, +28.159 ± 56.644, -252.047, 1e-05, seed7")
    assert file_numbers([tmp_path / "report.txt"]) == [-252.047, 1e-05, 7.0, 28.159, 56.644, 1071.0, 2054.0]
    numbers = sorted([0.992, 3222.898506973307, 655360.0, 20274.96, 306.0, -252.047, 1e-5])
    assert appears(99.2, 1, "%", numbers) and not appears(99.3, 1, "%", numbers)
    assert appears(3223, 0, "", numbers) and appears(3222.9, 1, "", numbers) and not appears(3222.8, 1, "", numbers)
    assert appears(0.66, 2, "M", numbers) and appears(20.3, 1, "k", numbers) and not appears(20.2, 1, "k", numbers)
    assert appears(5.1, 1, "min", numbers) and appears(-252, 0, "", numbers) and not appears(252, 0, "", numbers)


def test_results_tables_are_found() -> None:
    """docs/results.md holds results tables, each citing its source."""
    assert any(t.document == RESULTS_PAGE for t in all_results_tables())


@pytest.mark.parametrize("table", all_results_tables(), ids=lambda t: f"{t.document.name}:{t.line}")
def test_every_number_of_a_results_table_is_in_the_file_it_cites(table: Table) -> None:
    numbers = [(row, n) for row in table.rows for n in table_numbers(row)]
    if not numbers:
        return
    assert table.cited, (f"{table.where()}: a results table with numbers cites no results file "
                         "(a 'Source: `benchmarks/results/<study>/<file>`' line under it)")
    missing = [name for name in table.cited if not any(REPO.glob(name))]
    assert not missing, f"{table.where()}: cites files that do not exist: {missing}"
    known = file_numbers(table.sources)
    absent = [f"{shown!r} in {row.strip()[:80]!r}" for row, (shown, value, decimals, unit) in numbers
              if not appears(value, decimals, unit, known)]
    assert not absent, (f"{table.where()}: numbers not in {[str(p.relative_to(REPO)) for p in table.sources]} "
                        f"(at the shown precision): " + "; ".join(absent))



def test_the_results_speak_of_the_project_not_of_working_sessions() -> None:
    """The README, the docs and the files under benchmarks/results (names and text) say what was measured
    where, not in which working session or for which issue."""
    diary = re.compile(r"\bsessions?[ _-]?\d+|\bthis session\b|\bissues?\s*#?\d+", re.IGNORECASE)
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    hits = [str(p.relative_to(REPO)) for p in pages if diary.search(p.read_text(encoding="utf-8"))]
    for path in sorted(p for p in RESULTS.rglob("*") if p.is_file()):
        name = str(path.relative_to(REPO))
        if diary.search(name) or (path.suffix != ".png" and diary.search(path.read_text(errors="replace"))):
            hits.append(name)
    assert not hits, f"working-session narrative in {hits}"
