"""Dataset reading and validation: JSON array or JSONL files in the alpaca, qa,
conversations, sharegpt, text, preference, openai_dpo or kto format, normalised to chat
messages (and chosen/rejected or labelled replies for preference training).

Tokenisation (chat template, loss mask, packing) lives in `sage_ray.data.tokenize`,
imported on its own so that reading a dataset never pulls in transformers.
"""

from __future__ import annotations

from sage_ray.data.errors import DatasetError
from sage_ray.data.formats import FORMATS, KINDS, Example, detect_format, to_example
from sage_ray.data.loader import (
    MAX_DATASET_BYTES,
    MAX_DATASET_ENV,
    METHOD_KINDS,
    Dataset,
    check_method,
    load_dataset,
    max_dataset_bytes,
    parse_dataset_bytes,
)

__all__ = [
    "FORMATS",
    "KINDS",
    "METHOD_KINDS",
    "MAX_DATASET_BYTES",
    "MAX_DATASET_ENV",
    "Dataset",
    "DatasetError",
    "Example",
    "check_method",
    "detect_format",
    "load_dataset",
    "max_dataset_bytes",
    "parse_dataset_bytes",
    "to_example",
]
