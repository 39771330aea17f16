"""One source for every measured number: a figure that README or the docs quote beside a link to a
results file must be found, verbatim, in the file it links to.

The rule, precisely:

- Documents checked: README.md, docs/*.md and the hand-written README.md of each report folder
  (docs/*_report/README.md and those of its sub-folders). Fenced code blocks and inline code spans
  are left out (flags, config values and commands are not measurements).
- A passage is a paragraph, a list item (with its continuation lines) or a table row. A list item
  also carries the links of its lead-in: the paragraph just before its list.
- Results files: the text files (.md, .csv, .json, .txt) of a report folder (docs/*_report/, its
  sub-folders included; not its hand-written README.md) and of benchmarks/results/. A link to a report folder or to its README.md
  stands for every results file of that folder.
- Figures: an "a ± b" pair, and any other number with a decimal point (e.g. 27.3, −0.54, 0.097).
  Version strings such as 2.14.1 are not figures.
- Every figure of a passage that links to at least one results file must appear in one of the
  passage's linked results files, with the same digits (a Unicode minus reads as "-", a leading "+"
  is dropped, the spaces around "±" are ignored) and not as part of a longer number. A link to a
  results file that does not exist fails too.

So a figure is quoted with its source beside it, or not at all: quote it from the report as
written (14.10, not 14.1), and fix the README when a regenerated report changes it.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs").glob("*_report/**/README.md")])

PAIR = re.compile(r"(?<![\w.])([-+−]?\d+(?:\.\d+)?)\s*±\s*(\d+(?:\.\d+)?)(?!\w|\.\d)")
DECIMAL = re.compile(r"(?<![\w.])[-+−]?\d+\.\d+(?!\.?\d)")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)[^)]*\)")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s+")


def normalise(text: str) -> str:
    text = text.replace("−", "-")
    return re.sub(r"\s*±\s*", " ± ", text)


def figures(text: str) -> list[str]:
    """The `a ± b` pairs and the other decimal numbers of a passage's prose, normalised."""
    text = normalise(text)
    pairs = [f"{a.lstrip('+')} ± {b}" for a, b in PAIR.findall(text)]
    rest = PAIR.sub(" ", text)
    return pairs + [m.lstrip("+") for m in DECIMAL.findall(rest)]


def found_in(figure: str, source: str) -> bool:
    """Whether `figure` stands in `source` (both normalised) as a whole number, not inside a longer one."""
    return re.search(rf"(?<![\d.]){re.escape(figure)}(?!\d|\.\d)", source) is not None


def passages(path: Path) -> list[tuple[int, str, list[str]]]:
    """`(first line, prose, link targets)` of each passage of `path`, code left out; a list item or
    table row carries its lead-in paragraph's links too."""
    out, lines, start, kind, fenced, lead_links = [], [], 0, "paragraph", False, []

    def flush():
        nonlocal lead_links
        if lines:
            text = " ".join(lines)
            links = [target for _, target in LINK.findall(text)]
            if kind == "paragraph":
                lead_links = links
            else:
                links = links + lead_links
            out.append((start, re.sub(r"`[^`]*`", " ", LINK.sub(lambda m: m.group(1), text)), links))
            lines.clear()

    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            flush()
            fenced = not fenced
            continue
        heading = line.lstrip().startswith("#")
        if fenced or not line.strip() or heading:
            flush()
            lead_links = [] if heading else lead_links
            continue
        new_kind = "item" if LIST_ITEM.match(line) else "row" if line.lstrip().startswith("|") else None
        if new_kind or kind == "row":
            flush()
        if not lines:
            start, kind = number, new_kind or "paragraph"
        lines.append(line.strip())
    flush()
    return out


RESULTS_SUFFIXES = (".md", ".csv", ".json", ".txt")  # a figure, a script or a config holds no measured figure


def results_files(document: Path, target: str) -> list[Path]:
    """The results files a link target of `document` stands for (none for other targets)."""
    if re.match(r"^[a-z]+:", target) or target.startswith("#"):
        return []
    path = (document.parent / target.split("#")[0]).resolve()
    folder = path if path.is_dir() else path.parent
    for report in sorted((ROOT / "docs").glob("*_report")):
        if folder == report.resolve() or report.resolve() in folder.parents:
            if path.is_dir() or path.name == "README.md":
                return [p for p in sorted(report.rglob("*")) if p.is_file() and p.name != "README.md"
                        and p.suffix in RESULTS_SUFFIXES]
            return [path] if path.name != "README.md" and path.suffix in RESULTS_SUFFIXES else []
    if (ROOT / "benchmarks" / "results").resolve() in path.parents:
        return [path]
    return []


def quoted_figures():
    """`(document, first line, prose, results files)` of every passage that links to results files."""
    for document in DOCUMENTS:
        for line, prose, links in passages(document):
            sources = sorted({p for target in links for p in results_files(document, target)})
            if sources:
                yield document, line, prose, sources


def test_the_rule_reads_passages_and_figures():
    assert figures("FID 229.5 against 188.7 ± 7.0; differences −0.54 ± 0.99 to +0.22 ± 0.43, torch 2.14.1") == [
        "188.7 ± 7.0", "-0.54 ± 0.99", "0.22 ± 0.43", "229.5"]
    assert found_in("13.37 ± 0.91", "| 13.370 | 13.37 ± 0.91 |") and not found_in("3.37 ± 0.91", "13.37 ± 0.91")
    assert not found_in("0.5", "10.52") and not found_in("0.5", "0.55") and found_in("0.5", "drop 0.5,")
    assert found_in("-0.013", "AURG | -0.013 |") and not found_in("0.97", "0.975")


def test_passages_carry_their_lead_in_links_and_leave_code_out(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("Intro [r](a/report.md) says:\n\n- first 1.5\n  continued 2.5\n- second `--x 3.5`\n\n"
                   "```\n4.5\n```\n\n# Head\n\n- third 5.5\n")
    got = [(line, figures(prose), links) for line, prose, links in passages(doc)]
    assert got == [(1, [], ["a/report.md"]), (3, ["1.5", "2.5"], ["a/report.md"]), (5, [], ["a/report.md"]),
                   (13, ["5.5"], [])]


def test_some_figures_are_checked():
    checked = [d.relative_to(ROOT).as_posix() for d, *_ in quoted_figures()]
    assert "README.md" in checked and "docs/evaluation.md" in checked


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_figures_are_found_in_the_linked_results(document):
    missing = []
    for doc, line, prose, sources in quoted_figures():
        if doc != document:
            continue
        missing += [f"line {line}: links to {p.relative_to(ROOT).as_posix()}, which does not exist"
                    for p in sources if not p.is_file()]
        texts = [normalise(p.read_text()) for p in sources if p.is_file()]
        for figure in figures(prose):
            if not any(found_in(figure, text) for text in texts):
                missing.append(f"line {line}: {figure!r} is in none of "
                               f"{[p.relative_to(ROOT).as_posix() for p in sources]}")
    assert not missing, "\n".join(missing)
