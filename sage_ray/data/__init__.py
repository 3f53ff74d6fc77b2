"""Dataset reading and validation: JSON array or JSONL files in the alpaca, qa,
conversations, sharegpt or text format, normalised to chat messages.

Tokenisation (chat template, loss mask, packing) lives in `sage_ray.data.tokenize`,
imported on its own so that reading a dataset never pulls in transformers.
"""

from __future__ import annotations

from sage_ray.data.errors import DatasetError
from sage_ray.data.formats import FORMATS, Example, detect_format, to_example
from sage_ray.data.loader import (
    MAX_DATASET_BYTES,
    MAX_DATASET_ENV,
    Dataset,
    load_dataset,
    max_dataset_bytes,
    parse_dataset_bytes,
)

__all__ = [
    "FORMATS",
    "MAX_DATASET_BYTES",
    "MAX_DATASET_ENV",
    "Dataset",
    "DatasetError",
    "Example",
    "detect_format",
    "load_dataset",
    "max_dataset_bytes",
    "parse_dataset_bytes",
    "to_example",
]
