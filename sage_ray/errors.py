"""SageError: the one base of the errors a user can fix, each carrying the HTTP status the API
answers with. Anything else that escapes a route is a bug and surfaces as a 500.

The CLI prints a SageError's message and exits 1, the train entry point writes it to the job's
log, the Studio answers `http_status` with the message (and `detail()` when there is one).
"""

from __future__ import annotations

from typing import Any


class SageError(Exception):
    """A user-facing error; the message says what went wrong and what to do."""

    http_status = 400

    def detail(self) -> dict[str, Any] | None:
        """Structured fields for an API client (file, line, field...), when the error has them."""
        return None


class JobError(SageError):
    """Base of the fine-tune job errors; as itself: Ray Jobs could not take or answer the request now."""

    http_status = 503


class JobNotFoundError(JobError, LookupError):
    """No job with that task id."""

    http_status = 404


class JobStateError(JobError):
    """Not possible in the job's current state (delete a running job, resume a completed one)."""

    http_status = 409


class JobTimeoutError(JobError, TimeoutError):
    """wait() ran out of time; the job itself keeps running."""

    http_status = 504


class RegistryError(Exception):
    """Base of the registry's errors; each message says what to do next."""


class NotFoundError(SageError, RegistryError, LookupError):
    """No artifact or job by that name."""

    http_status = 404


class AlreadyExistsError(SageError, RegistryError):
    """The name or task id is taken."""

    http_status = 409


class InUseError(SageError, RegistryError):
    """Refused: the artifact is the active model, or the job is still running."""

    http_status = 409


class RegistryValueError(SageError, RegistryError, ValueError):
    """An unknown field, or a value outside its choices."""
