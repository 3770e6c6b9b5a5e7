"""The documentation stays true to the code: the generated configuration reference lists every declared key,
and the README stays a screen of user documentation (no commit hashes, no machine-local paths)."""

import ast
import importlib.util
import re
from pathlib import Path

from distill_runner import spec
from distill_runner.distill import terms

ROOT = Path(__file__).resolve().parents[2]
HOOK = ROOT / "docs" / "hooks" / "config_reference.py"
# 7-40 hex characters with at least one digit and one letter: a commit hash, not a word or a number
DOCS_LINE = re.compile(r"^Docs: (docs/\S+\.md)", re.M)
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")


def _hook():
    loaded = importlib.util.spec_from_file_location("config_reference", HOOK)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def test_generated_reference_lists_every_declared_key_and_term():
    rendered = _hook().render()
    missing = [k.path for k in spec.reference() if f"| `{k.path}` |" not in rendered]
    assert not missing, f"keys spec declares but the reference omits: {missing}"
    assert all(f"`distill_runner.distill.terms.{name}`" in rendered for name in terms.__all__)
    assert "| `distill.temperature` |" in rendered and "| `distill.alpha` |" in rendered


def test_reference_page_and_mkdocs_use_the_hook():
    page = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    assert _hook().MARKER in page
    assert "docs/hooks/config_reference.py" in (ROOT / "mkdocs.yml").read_text()


def test_commit_hash_pattern_finds_hashes_not_numbers():
    assert COMMIT_HASH.search("measured at commit 8e0270b on the VM")
    assert not COMMIT_HASH.search("11173962 parameters, 105,562, the deadbee-free cafe")


def test_readme_is_a_screen_of_user_documentation():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines; move detail into docs/"
    text = "\n".join(lines)
    assert not COMMIT_HASH.findall(text), f"commit hashes in README.md: {COMMIT_HASH.findall(text)}"
    assert "/work/" not in text, "a machine-local path in README.md"


def test_every_module_docstring_points_to_an_existing_docs_page():
    unpointed, missing = [], []
    for path in sorted((ROOT / "distill_runner").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        pages = DOCS_LINE.findall(doc)
        unpointed += [] if pages else [str(path.relative_to(ROOT))]
        missing += [p for p in pages if not (ROOT / p).is_file()]
    assert not unpointed, f"module docstrings without a 'Docs: docs/<page>.md' line: {unpointed}"
    assert not missing, f"module docstrings point to docs pages that do not exist: {missing}"
