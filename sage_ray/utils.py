"""Small shared helpers: optional-dependency checks in one place (PEFT style)."""

from __future__ import annotations

import importlib.util


def is_available(module: str) -> bool:
    """True when `module` can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def require(module: str, purpose: str, extra: str | None = None) -> None:
    """Raise an ImportError that says what to install when `module` is missing."""
    if is_available(module):
        return
    install = f"pip install 'sage-ray[{extra}]'" if extra else f"pip install {module}"
    raise ImportError(f"{purpose} needs the '{module}' package: {install}")
