"""The resolved config as commented YAML (`python -m imm_fast config`): one line per key with its field doc.

The docs are the trailing comments of the dataclass fields in imm_fast/config.py (the house style puts the meaning
and unit of every field there), read from the source with `tokenize`, so they cannot drift from the code. The
output loads back unchanged with `train --config FILE`.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import tokenize


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict:
    """{field name: its trailing comment (continuation comment lines joined)} of a dataclass defined in source."""
    src = inspect.getsource(inspect.getmodule(cls))
    comments = {}  # line number -> comment text
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    tree = ast.parse(src)
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs = {}
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            text = [comments[stmt.end_lineno]] if stmt.end_lineno in comments else []
            line = stmt.end_lineno + 1
            while line in comments and line not in code_lines:  # a comment continued on the next lines
                text.append(comments[line])
                line += 1
            docs[stmt.target.id] = " ".join(text)
    return docs


def _scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if not isinstance(value, float) or value == value else ".nan"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return json.dumps(value)  # a quoted YAML string (JSON strings are valid YAML)


def to_yaml(cfg, indent: int = 0) -> str:
    """Commented YAML of a (nested) config dataclass; nested configs become sections."""
    docs = field_docs(type(cfg))
    pad = " " * indent
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        doc = docs.get(f.name, "")
        if dataclasses.is_dataclass(value):
            rows.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
            rows.append(to_yaml(value, indent + 2))
        else:
            rows.append(f"{pad}{f.name}: {_scalar(value)}" + (f"  # {doc}" if doc else ""))
    return "\n".join(rows)
