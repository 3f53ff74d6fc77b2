"""Constrained decoding for the transformers engine: JSON Schema -> per-step token masks.

llguidance (the library vLLM also uses for structured output) compiles a schema into a
grammar and, at each step, says which tokens may come next; the engine masks the rest.
"""

from __future__ import annotations

from typing import Any

from sage_ray.errors import SageError
from sage_ray.serve.engines.base import EngineError

# At most one space between JSON tokens (`{"a": 1, "b": 2}`): with free whitespace a weak
# model fills the whole reply with tabs and newlines and never closes the object.
JSON_OPTIONS = {"whitespace_pattern": r"\x20?"}
ANY_OBJECT = {"type": "object"}


class GrammarError(SageError, EngineError):
    """A JSON schema the constrained decoder cannot compile; the message names the problem."""

    http_status = 400


def json_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar for `schema`, checked; GrammarError says what in it is not supported."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as err:
        raise GrammarError(f"response_format json_schema: {err}") from None
    problem = LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise GrammarError(f"response_format json_schema cannot be enforced: {problem}")
    return grammar


class TokenViews:
    """llguidance's view of each tokenizer (built once: ~1 s for a large vocabulary): matchers
    for JSON schemas, and the exact bytes of a token (a byte-level BPE token may hold half a
    character, which decodes to U+FFFD; OpenAI's logprobs report its true bytes)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._tokenizers: dict[int, tuple[Any, Any]] = {}

    def view(self, tokenizer, stop_ids: list[int]):
        key = id(tokenizer)
        if key not in self._tokenizers:
            import llguidance.hf

            # kept beside its LLTokenizer so the id stays that of a live object
            self._tokenizers[key] = (tokenizer, llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=self.vocab_size, eos_token=stop_ids or None))
        return self._tokenizers[key][1]

    def attach(self, request, tokenizer, stop_ids: list[int]) -> None:
        """Give an hf_batch.Request its matcher (params.json_schema) and token_bytes (params.logprobs)."""
        view = self.view(tokenizer, stop_ids)
        if request.params.json_schema is not None:
            request.matcher = self.matcher(tokenizer, stop_ids, request.params.json_schema)
        if request.params.logprobs:
            request.token_bytes = lambda token: view.decode_bytes([token])

    def matcher(self, tokenizer, stop_ids: list[int], schema: dict[str, Any]):
        from llguidance import LLMatcher

        matcher = LLMatcher(self.view(tokenizer, stop_ids), json_grammar(schema), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"response_format json_schema: {matcher.get_error()}")
        return matcher


def allowed_tokens(matcher, vocab_size: int):
    """A bool tensor over the vocabulary: True for the tokens the grammar allows next."""
    import numpy as np
    import torch

    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return torch.from_numpy(bits[:vocab_size].astype(bool))
