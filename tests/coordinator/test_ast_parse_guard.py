"""The CPython 3.11 AST race workaround (coordinator/federation/simulation.py): parses the same,
installs once, and only where the interpreter has the bug."""

from __future__ import annotations

import ast
import sys
import threading

from coordinator.federation.simulation import _serialize_ast_parse


def test_guarded_parse_is_installed_once_and_parses_the_same_in_threads() -> None:
    source = "def f(x):\n    return [i * x for i in range(3)]\n"
    expected = ast.dump(ast.parse(source))
    _serialize_ast_parse()
    first = ast.parse
    _serialize_ast_parse()
    assert ast.parse is first  # idempotent
    assert getattr(ast.parse, "_offsite_serialized", False) == (sys.version_info < (3, 11, 8))
    results: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: results.extend(ast.dump(ast.parse(source)) for _ in range(50))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 200 and set(results) == {expected}
