"""The manual's reference pages are generated from the code and must match it; every
reason the code raises is in the catalogue; the layout stays readable."""
import ast
import os

from ingest import reference
from ingest.errors import REASONS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "ingest")
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def _modules():
    for dirpath, _dirs, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as fh:
                    yield os.path.relpath(path, ROOT), fh.read()


def test_reference_pages_are_what_the_code_generates():
    assert reference.stale() == [], "stale pages: run `python -m ingest.reference`"


def test_every_reason_raised_is_in_the_catalogue():
    raised = set()
    for path, text in _modules():
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("IngestError", "RecordRejected") and node.args
                    and isinstance(node.args[0], ast.Constant)):
                raised.add((path, node.args[0].value))
    assert raised, "the scan found no raise sites at all"
    unknown = sorted(r for r in raised if r[1] not in REASONS)
    assert unknown == []


def test_every_reason_is_documented_with_a_status_and_a_meaning():
    for name, entry in REASONS.items():
        assert entry.meaning and entry.messages["message"], name
        assert entry.status is not None or entry.scopes == ("record",), name


def test_functions_and_modules_stay_short():
    """No function longer than ~60 lines, no module longer than ~500, unless its
    docstring says why (it then contains the words 'long because')."""
    too_long = []
    for path, text in _modules():
        tree = ast.parse(text)
        excused = "long because" in (ast.get_docstring(tree) or "")
        if text.count("\n") > MAX_MODULE_LINES and not excused:
            too_long.append("%s: %d lines" % (path, text.count("\n")))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and "long because" not in (
                        ast.get_docstring(node) or ""):
                    too_long.append("%s:%d %s(): %d lines" % (path, node.lineno, node.name,
                                                              lines))
    assert too_long == []
