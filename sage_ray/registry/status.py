"""A fine-tune job's status: the one list of them, and the groups the code asks about.

queued -> preparing -> training -> (merging) -> completed | failed | cancelled; a failed or
cancelled job may be resumed (back to queued). A StrEnum: the values are the strings stored in
registry.db and sent over HTTP, so a record read back compares equal to its member.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    PREPARING = "preparing"
    TRAINING = "training"
    MERGING = "merging"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATUSES = tuple(JobStatus)
TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
RUNNING = frozenset({JobStatus.PREPARING, JobStatus.TRAINING, JobStatus.MERGING})
ACTIVE = (JobStatus.QUEUED, *sorted(RUNNING, key=STATUSES.index))  # not ended yet
RESUMABLE = (JobStatus.FAILED, JobStatus.CANCELLED)
