"""The README stays short and keeps the two set-up commands; every relative link of README.md and docs/*.md leads
to a file of this repository (and to a heading there when it names one), and nothing points outside it."""

import re
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
PAGES = [CHECKOUT / "README.md", *sorted((CHECKOUT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (where `[a](b)` is no link)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_short_and_keeps_the_two_commands():
    text = (CHECKOUT / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    assert "python3 -m pip install -e '.[dev]' && asd-ray run --out runs/demo" in text
    assert len(PAGES) >= 6  # README plus the guides it sends a reader to


def test_ci_runs_the_readme_commands_and_then_the_tests_the_readme_leaves_out():
    """The README's test command leaves out the tests marked slow; .ci/run runs them after the README's two commands
    (read from the README by .ci/readme_commands.py), so CI runs every test."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(CHECKOUT / ".ci" / "readme_commands.py"), str(CHECKOUT / "README.md")],
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["python3 -m pip install -e '.[dev]' && asd-ray run --out runs/demo",
                                        "python3 -m pytest -q -m 'not slow'"]
    ci = (CHECKOUT / ".ci" / "run").read_text()
    assert 'for command in "${commands[@]}" "python3 -m pytest -q -m slow"; do' in ci


def test_every_relative_link_resolves_inside_the_repository():
    checked = 0
    for page in PAGES:
        text = page.read_text()
        assert "../" not in text, f"{page.name} points outside its folder"
        for target in LINK.findall(prose(text)):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.is_relative_to(CHECKOUT), f"{page.name}: {target} leaves the repository"
            assert dest.is_file(), f"{page.name}: {target} is no file"
            if anchor:
                assert anchor in anchors(dest), f"{page.name}: {target}: no such heading in {dest.name}"
            checked += 1
    assert checked >= 20
