"""The TOML writer (only what the importer needs, with comments) and :func:`write_import`."""

from __future__ import annotations

import json
from pathlib import Path

from ..certs import _atomic_write
from .report import ImportResult, KaazingImportError


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def wrap(text: str, width: int) -> list[str]:
    words = text.replace("\n", " ").split(" ")
    lines, cur = [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = "    " + w if text.startswith("  ") else w
        else:
            cur = f"{cur} {w}" if cur else w
    lines.append(cur)
    return lines


class Toml:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def blank(self) -> None:
        if self.lines and self.lines[-1] != "":
            self.lines.append("")

    def table(self, name: str, array: bool = False) -> None:
        if not array or (self.lines and not self.lines[-1].startswith("#")):
            self.blank()
        self.lines.append(f"[[{name}]]" if array else f"[{name}]")

    def comment(self, text: str) -> None:
        for part in wrap(text, 110):
            self.lines.append(f"# {part}".rstrip())

    def comment_block(self, lines: list[str]) -> None:
        for line in lines:
            self.lines.append(f"# {line}".rstrip() if line else "")

    def key(self, key: str, value: object, comment: str | list[str] | None = None) -> None:
        if isinstance(comment, list):
            for c in comment:
                self.comment(c)
        elif comment:
            self.comment(comment)
        self.lines.append(f"{key} = {_toml_value(value)}")

    def text(self) -> str:
        return "\n".join(self.lines).strip("\n") + "\n"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_import(result: ImportResult, out: Path, *, force: bool = False) -> list[Path]:
    """Write the TOML to ``out`` and the converted PEM files next to it; return the paths written.

    Refuses to replace existing files unless ``force``.
    """
    if result.toml is None:
        return []
    out = Path(out)
    targets = [out] + [out.parent / name for name in result.files]
    if not force:
        existing = [p for p in targets if p.exists()]
        if existing:
            raise KaazingImportError(f"{', '.join(map(str, existing))} already exist(s); remove them or give --force "
                                     "to replace them")
    written = []
    for name, (data, mode) in result.files.items():
        path = out.parent / name
        try:
            _atomic_write(path, data, mode)
        except OSError as exc:
            raise KaazingImportError(f"cannot write {path}: {exc.strerror or exc}") from None
        written.append(path)
    try:
        _atomic_write(out, result.toml.encode("utf-8"), 0o644)
    except OSError as exc:
        raise KaazingImportError(f"cannot write {out}: {exc.strerror or exc}") from None
    return [out, *written]
