"""The documentation: generated sections match the code, links resolve, the README is a front page.

``docs/generate.py`` renders the reference tables (options, configuration keys, checks, ...)
from the code between marker comments; a page that differs from a fresh rendering fails here, so
a new option, key or check cannot go undocumented and a stale row cannot survive.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest

import harness.checks.structure as structure
import harness.plugin.options as plugin_options
from harness.run import config as gate_config
from harness.run.check import Check
from harness.run.knobs import KNOBS, Knob, parse_examples
from harness.run.result import CheckResult, Family

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
#: The README is the package's front page (and its long description): it stays short.
README_MAX_LINES = 220


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generate() -> ModuleType:
    return load_generator()


def page(name: str) -> Path:
    return DOCS / name


# ---- generated sections -------------------------------------------------------------------


def test_generated_sections_match_the_code(generate):
    stale = sorted(str(p.relative_to(ROOT)) for p in generate.stale_pages())
    assert stale == [], f"stale generated sections in {stale}: run python docs/generate.py"


def test_every_section_is_on_a_page(generate):
    used = {name for p in PAGES for name in generate.used_sections(p.read_text("utf-8"))}
    assert set(generate.SECTIONS) <= used, set(generate.SECTIONS) - used
    assert used <= set(generate.SECTIONS)


def test_reference_pages_hold_their_sections(generate):
    """Deleting a section's markers would make its page 'match' trivially: they must be there."""
    expected = {
        "options.md": {"options", "ini"},
        "configuration.md": {
            "config-keys", "config-benchmark", "config-thresholds", "config-perplexity",
        },
        "checks.md": {"families", "checks"},
        "github-actions.md": {"action-inputs", "action-outputs"},
        "cli.md": {"cli"},
    }
    for name, sections in expected.items():
        assert sections <= set(generate.used_sections(page(name).read_text("utf-8"))), name
    assert "families" in generate.used_sections(README.read_text("utf-8"))


def test_every_option_key_and_check_is_documented(generate):
    options = page("options.md").read_text("utf-8")
    for knob in KNOBS:
        assert f"`{knob.flag} {knob.metavar}`" in options
    for flag, dest, _ in plugin_options.PATH_OPTIONS:
        assert f"`{flag} PATH`" in options
        assert f"`{dest}`" in options  # the ini key
    configuration = page("configuration.md").read_text("utf-8")
    for keys in (gate_config.KEYS, gate_config.BENCHMARK_KEYS, gate_config.THRESHOLD_KEYS,
                 gate_config.PERPLEXITY_KEYS):
        for key in keys:
            assert f"| `{key}` |" in configuration, key
    checks = page("checks.md").read_text("utf-8")
    for check in generate.every_check():
        assert f"`{check.id}`" in checks
    for family in Family:
        assert f"| `{family.value}` |" in checks


def test_a_new_option_key_or_check_makes_the_pages_stale(generate, monkeypatch):
    """What another engineer adds to the code shows up when the pages are generated again."""
    knob = Knob("examples", "--merge-new-knob", "new_knob", parse_examples, 3, "N",
                "a knob added after the docs were written")
    monkeypatch.setattr(plugin_options, "KNOBS", (*KNOBS, knob))
    monkeypatch.setitem(gate_config.KEYS, "extra_key", "a key added after the docs were written")
    original = structure.checks

    def more_checks(settings):
        added = Check(Family.STRUCTURE, "new_check", "a check added after the docs were written",
                      lambda ctx: CheckResult.passed("ok"))
        return [*original(settings), added]

    monkeypatch.setattr(structure, "checks", more_checks)
    stale = generate.stale_pages()
    assert {page("options.md"), page("configuration.md"), page("checks.md")} <= set(stale)
    assert "`--merge-new-knob N`" in stale[page("options.md")]
    assert "| `extra_key` |" in stale[page("configuration.md")]
    assert "`merge::structure::new_check`" in stale[page("checks.md")]
    # The README's family table counts the checks of each family.
    assert README in stale


def test_a_hand_edit_inside_a_section_is_undone(generate):
    text = page("options.md").read_text("utf-8")
    edited = text.replace("| `--merge-ulp K` | `1` |", "| `--merge-ulp K` | `2` |")
    assert edited != text
    assert generate.render(edited) == text


def test_markers_must_be_balanced_and_known(generate):
    with pytest.raises(generate.MarkerError, match="unknown section 'nope'"):
        generate.render("<!-- generated: nope -->\n<!-- end generated -->\n")
    with pytest.raises(generate.MarkerError, match="has no"):
        generate.render("<!-- generated: options -->\n")
    with pytest.raises(generate.MarkerError, match="without a start marker"):
        generate.render("text\n<!-- end generated -->\n")
    example = "```text\n<!-- generated: options -->\n<!-- end generated -->\n```\n"
    assert generate.render(example) == example  # markers in code blocks are examples


def test_every_family_needs_a_description(generate, monkeypatch):
    monkeypatch.delitem(generate.FAMILY_NOTES, Family.LOCK)
    with pytest.raises(SystemExit, match="FAMILY_NOTES"):
        generate.every_check()


# ---- links ----------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose_of(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are examples)."""
    text = re.sub(r"^(\s*)(`{3,}|~{3,}).*?^\1\2[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`+[^`\n]*`+", "", text)


def slug(heading: str) -> str:
    """Python-Markdown's toc slug of a heading (code and markup stripped)."""
    text = re.sub(r"[`*_]", "", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^(`{3,}).*?^\1", "", path.read_text("utf-8"), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose_of(path.read_text("utf-8")))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")
    ]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(path: Path):
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve()
        assert resolved.exists(), f"{path.name}: {target} -> {resolved} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{path.name}: no heading #{anchor} in {file}"


def test_the_link_checker_sees_a_broken_link(tmp_path: Path):
    broken = tmp_path / "page.md"
    broken.write_text("See [this](missing.md) and `[not a link](x.md)`.\n", encoding="utf-8")
    assert relative_links(broken) == ["missing.md"]


# ---- the README --------------------------------------------------------------------------


def test_readme_is_a_front_page():
    lines = README.read_text("utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    opening = lines[: lines.index("```", 3) + 1]  # the title, then the first code block
    assert opening[0].startswith("# ") and opening[2].startswith("```")
    commands = [line.split("#")[0].strip() for line in opening[3:-1]]
    assert commands == ["bash .ci/demo", "bash .ci/run"]
    for script in ("demo", "run"):
        assert (ROOT / ".ci" / script).is_file()


HISTORY = (
    re.compile(r"\bissues?\s*#?\d+", re.I),
    re.compile(r"\bcommit\s+`?[0-9a-f]{7,40}\b", re.I),
    re.compile(r"DESIGN\.md|design card|ARCHITECTURE\.md"),
)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_carry_no_development_history(path: Path):
    text = path.read_text("utf-8")
    for pattern in HISTORY:
        assert not pattern.search(text), f"{path.name}: {pattern.search(text)}"


# ---- the site ----------------------------------------------------------------------------


def build_site(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` (never ``--quiet``: mkdocs 1.6 then stops counting warnings)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
         "--site-dir", str(site)],
        cwd=site.parent, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_mkdocs_builds_strict_outside_the_checkout(tmp_path: Path):
    site = tmp_path / "site"
    done = build_site(ROOT / "mkdocs.yml", site)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "index.html").is_file() and (site / "options" / "index.html").is_file()
    assert not (ROOT / "site").exists()
    assert not (site / "generate.py").exists()


def test_the_strict_build_fails_on_a_broken_anchor(tmp_path: Path):
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text("utf-8") + "\n[x](install.md#no-such-heading)\n", "utf-8")
    done = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "no-such-heading" in done.stdout + done.stderr
