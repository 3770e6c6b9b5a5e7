"""No function in the package is longer than a reader can hold: MAX_LINES lines from its ``def`` to its last line
(the guide that replaces the module-size cap: split a long function into named steps, not a module into files)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distill_runner"
MAX_LINES = 60  # "about 60"


def long_functions(package: Path = PACKAGE, max_lines: int = MAX_LINES) -> dict[str, int]:
    """``{"<module path>:<function>": lines}`` of every function (methods and nested ones too) over ``max_lines``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > max_lines:
                    out[f"{path.relative_to(package).as_posix()}:{node.name}"] = lines
    return out


def test_no_function_is_over_max_lines():
    too_long = long_functions()
    assert not too_long, f"functions over {MAX_LINES} lines (split them into named steps): {too_long}"


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path) == {"m.py:long": MAX_LINES + 1}
