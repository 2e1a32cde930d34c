"""The documentation builds as a site (`mkdocs build --strict`, mkdocs.yml): every page is
in the nav, and no link points out of docs/ or to a heading that is not there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "metrics" / "index.html").exists()


def test_every_page_is_in_the_nav() -> None:
    nav = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert pages == nav


def test_no_citation_of_files_outside_the_repository() -> None:
    """The code, tests and docs cite docs/reference/contract.md ("contract §N") and
    docs/architecture/design.md ("design §N"), not files that are not in the repository."""
    found = []
    for top in ("metanode", "tests", "docs"):
        for path in (ROOT / top).rglob("*"):
            if path.suffix not in (".py", ".md") or path == Path(__file__).resolve():
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if re.search(r"SPEC §|DESIGN §|\bSTACK\.md|\bDESIGN\.md|\bSPEC\.md", line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"SPEC §|DESIGN §|\bSTACK\.md|\bDESIGN\.md", readme)
    assert not found, "\n".join(found)
