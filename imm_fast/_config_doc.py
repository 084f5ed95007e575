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
def _class_docs(cls) -> tuple:
    """({field: trailing comment}, {field: heading comment lines above it}) of the fields `cls` itself declares.

    A trailing comment continues on the next lines when they hold only a comment indented past the field (the
    house style aligns continuations under the comment); a comment at the field's own indentation is a heading of
    the fields below it, never part of the previous field's doc."""
    src = inspect.getsource(inspect.getmodule(cls))
    comments = {}  # line number -> (column, comment text)
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    node = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    docs, headings, taken = {}, {}, set()
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above, line = [], stmt.lineno - 1
        while line in comments and line not in code_lines and line not in taken:
            above.insert(0, comments[line][1])
            line -= 1
        headings[stmt.target.id] = above
        text = [comments[stmt.end_lineno][1]] if stmt.end_lineno in comments else []
        line = stmt.end_lineno + 1
        while line in comments and line not in code_lines and comments[line][0] > stmt.col_offset:
            text.append(comments[line][1])
            taken.add(line)
            line += 1
        docs[stmt.target.id] = " ".join(text)
    return docs, headings


def _mro_docs(cls, which: int) -> dict:
    out = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k) and "__dataclass_fields__" in
                           vars(k)]):
        try:
            out.update(_class_docs(klass)[which])
        except (OSError, TypeError, StopIteration):  # a class without source (built at run time): no docs
            pass
    return out


def field_docs(cls) -> dict:
    """{field name: its trailing comment (continuation comment lines joined)} of a dataclass defined in source,
    its base classes' fields included (a backbone's section extends the shared model fields)."""
    return _mro_docs(cls, 0)


def field_headings(cls) -> dict:
    """{field name: the comment lines that stand alone above it (a heading of the fields that follow)}."""
    return _mro_docs(cls, 1)


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
    docs, headings = field_docs(type(cfg)), field_headings(type(cfg))
    pad = " " * indent
    rows = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        doc = docs.get(f.name, "")
        rows.extend(f"{pad}# {line}" for line in headings.get(f.name, ()))
        if dataclasses.is_dataclass(value):
            rows.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
            rows.append(to_yaml(value, indent + 2))
        else:
            rows.append(f"{pad}{f.name}: {_scalar(value)}" + (f"  # {doc}" if doc else ""))
    return "\n".join(rows)
