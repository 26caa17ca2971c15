"""The documentation cannot drift from the repository: CI runs the README's test command, every relative link
resolves, the README stays a front page, and code cites only the paper and docs/ (no file outside the repository)."""

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGES = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md")), *sorted((HERE / "results").glob("*/README.md")),
         HERE / "bench" / "README.md"]


def test_ci_runs_the_readme_test_command():
    readme = (HERE / "README.md").read_text()
    (command,) = [x for x in readme.splitlines() if x.startswith("python -m pip install -e '.[test]'")]
    assert command in (HERE / ".ci" / "run").read_text().splitlines()


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(HERE)} -> {target}")
    assert not broken, broken


def test_readme_is_a_front_page():
    assert len((HERE / "README.md").read_text().splitlines()) <= 250


def test_code_cites_only_the_paper_and_docs():
    # The names of the briefing files outside the repository, spelt so that this line does not match itself.
    pattern = re.compile("|".join(["section" + r"4\.md", "method" + "-notes", "issue" + " [0-9]"]))
    hits = [f"{p.relative_to(HERE)}:{i + 1}" for p in [*HERE.glob("*.py"), *HERE.glob("bench/*.py")]
            for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert not hits, hits
