"""Errors that speak to the user. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class ChatRLHFError(Exception):
    """Bad input or usage: printed without a traceback."""

    def __init__(self, message: str, hint: str = ""):
        self.message = message
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class UsageError(ChatRLHFError):
    """A flag, a config value or a missing package."""


class DataError(ChatRLHFError):
    """A bad record: names the file, the line (or row) and the field."""

    def __init__(self, path, line: int | str | None, field: str | None, problem: str, hint: str = ""):
        # line: a line number (CSV, JSONL) or a label such as "item 3" / "row 7" (JSON, parquet)
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': {problem}" if field else problem
        super().__init__(f"{where}: {what}", hint)
