"""The one error raised for a bad dataset: where the problem is, what it is, what to do."""

from __future__ import annotations

from typing import Any

from sage_ray.errors import SageError


def json_type(value: Any) -> str:
    """Name a parsed JSON value's type the way a user reading the file would."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class DatasetError(SageError, ValueError):
    """A dataset problem, located in its file, with the fix.

    `str(err)` reads like: "data/train.jsonl, line 3: field 'output' must be a string,
    got a number. Fix: put the answer text in 'output', as a string in double quotes."
    """

    def __init__(
        self,
        path: str,
        problem: str,
        fix: str,
        location: str | None = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        self.location = location
        self.field = field
        where = f"{self.path}, {location}" if location else self.path
        end = "" if fix.endswith(".") else "."
        super().__init__(f"{where}: {problem}. Fix: {fix}{end}")

    def __reduce__(self) -> tuple:
        # Ray pickles exceptions across processes; the default rebuild would call
        # __init__ with the message only and fail.
        return (type(self), (self.path, self.problem, self.fix, self.location, self.field))

    def detail(self) -> dict[str, str | None]:
        return self.to_dict()

    def to_dict(self) -> dict[str, str | None]:
        """The parts of the error, for JSON API responses."""
        return {
            "message": str(self),
            "path": self.path,
            "location": self.location,
            "field": self.field,
            "problem": self.problem,
            "fix": self.fix,
        }
