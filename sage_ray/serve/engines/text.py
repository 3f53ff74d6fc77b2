"""Token ids to streamed text: incremental detokenization and stop strings.

Decoding one token at a time breaks multi-byte characters (a byte-level BPE splits "東"
or "😀" over several tokens) and SentencePiece's leading spaces. The standard fix (as in
vLLM and TGI) decodes a short window of recent tokens twice, with and without the newest
ones, emits the difference, and holds it back while it ends in an incomplete character.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Turns a growing list of completion token ids into text pieces whose concatenation equals decode(all)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # ids before this index have been turned into text

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text (may be "" while a character is incomplete)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back at the end of the reply (an incomplete character is emitted as is)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        full_text = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith(REPLACEMENT_CHAR)):
            self._prefix, self._read = self._read, len(self.ids)
            return full_text[len(prefix_text):]
        return ""


class StopMatcher:
    """Finds stop strings in streamed text and holds back a tail that could start one.

    Without the hold-back, "Obs" of a stop string "Observation:" would already be sent
    when the rest arrives.
    """

    def __init__(self, stop: list[str] | None) -> None:
        self.stop = [s for s in (stop or []) if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was hit); after a hit the reply is over."""
        if not self.stop:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._pending = self._pending[:min(hits)], ""
            return out, True
        cut = max(len(self._pending) - self._hold, 0)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back tail when the reply ends for another reason."""
        out, self._pending = self._pending, ""
        return out


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None, prompt: str | None = None) -> list[int]:
    """A request's prompt token ids, as both engines build them: the chat template over
    `messages` (with `tools` when the template renders them), or a raw `prompt` as it is."""
    from sage_ray.inference import encode_chat, renders_tools
    from sage_ray.serve.engines.base import EngineError, UnsupportedParamError

    if prompt is None:
        if tools and not renders_tools(tokenizer):
            raise UnsupportedParamError(f"tools: the chat template of {tokenizer.name_or_path} does not render "
                                        "tools; serve a model whose template supports tool calling")
        return encode_chat(tokenizer, messages, tools)
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise EngineError("the prompt is empty: send some text to continue")
    return ids
