"""One dynamic batch of chat requests through `model.generate`, streamed per request.

transformers' continuous batching (generate_batch / ContinuousBatchingManager, 5.23)
packs all requests into one row for paged attention, so peft's per-row `adapter_names`
cannot apply, and its sampling settings are per manager, not per request. So the hf
engine batches dynamically instead: requests that wait while a batch runs form the next
batch, which runs as one left-padded `generate` call where
  - each row keeps its own adapter (peft mixed-adapter batch, "__base__" for none),
  - each row keeps its own sampling settings (RowSampler picks every row's token),
  - each row ends on its own (RowsDone: eos, stop string, max_tokens, client gone),
  - every step's tokens go to each request's asyncio queue (RowStreamer).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from sage_ray.serve.engines.base import Delta, EngineError, SamplingParams
from sage_ray.serve.engines.text import IncrementalDecoder, StopMatcher, prompt_ids


@dataclass
class Request:
    """One chat request, from the event loop that waits for it to the worker thread that runs it."""

    messages: list[dict]
    adapter: str
    """peft adapter name, or BASE_ADAPTER."""
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_ids: list[int] = field(default_factory=list)
    max_new: int = 0
    """max_tokens clipped to the model's context."""
    stop_ids: frozenset = frozenset()
    completion_tokens: int = 0
    done: bool = False
    cancelled: bool = False
    decoder: IncrementalDecoder | None = None
    stopper: StopMatcher | None = None
    on_finish: Callable[["Request"], None] | None = None
    """Called in the worker thread just before the last Delta goes out (engine statistics)."""
    prompt: str | None = None
    """A raw prompt (/v1/completions): used as it is, no chat template; `messages` is then empty."""
    matcher: object | None = None
    """llguidance matcher of params.json_schema: RowSampler masks the tokens it does not allow."""
    token_bytes: Callable[[int], bytes] | None = None
    """Token id -> its exact bytes, for the logprobs entries."""
    step_logprobs: dict | None = None
    """The logprobs entry of the token RowSampler just chose (params.logprobs), for on_token."""
    logprobs: list[dict] = field(default_factory=list)
    """Entries not sent yet: they go out with the next Delta."""

    def prepare(self, tokenizer, stop_ids, context: int, token_views=None) -> None:
        """Tokenize the prompt, bind the artifact's stop tokens, clip max_tokens to the context left;
        with a JSON schema or logprobs, take the grammar matcher / token bytes from `token_views`."""
        prompt_ids = self._encode(tokenizer)
        if len(prompt_ids) >= context:
            raise EngineError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {context}: "
                              "shorten the conversation")
        if self.params.json_schema is not None or self.params.logprobs:
            token_views.attach(self, tokenizer, stop_ids)
        self.prompt_ids = prompt_ids
        self.stop_ids = frozenset(stop_ids)
        self.max_new = min(self.params.max_tokens, context - len(prompt_ids))
        self.decoder = IncrementalDecoder(tokenizer)
        self.stopper = StopMatcher(self.params.stop)

    def _encode(self, tokenizer) -> list[int]:
        """The prompt's token ids: the chat template over `messages`, or the raw `prompt` as it is."""
        return prompt_ids(tokenizer, self.messages, self.params.tools, self.prompt)

    def on_token(self, token: int) -> None:
        """Route one generated token: text out, or the end of the reply."""
        if self.cancelled:
            self.done = True
            return
        if token in self.stop_ids and not self.params.ignore_eos:
            self.finish("stop")
            return
        self.completion_tokens += 1
        if self.step_logprobs is not None:
            self.logprobs.append(self.step_logprobs)
            self.step_logprobs = None
        text, hit = self.stopper.feed(self.decoder.push(token))
        if hit:
            self.finish("stop", text_before=text, flush=False)
            return
        if text:
            self._send(Delta(text, logprobs=self._take_logprobs()))
        if self.completion_tokens >= self.max_new:
            self.finish("length")

    def finish(self, reason: str, *, text_before: str = "", flush: bool = True) -> None:
        """Send the last piece (held-back text, finish reason, token counts) and free the row."""
        if self.done:
            return
        self.done = True
        text = text_before
        if flush:
            tail, hit = self.stopper.feed(self.decoder.flush())
            text += tail if hit else tail + self.stopper.flush()
            reason = "stop" if hit else reason
        if self.on_finish is not None:
            self.on_finish(self)
        self._send(Delta(text, reason, len(self.prompt_ids), self.completion_tokens, self._take_logprobs()))

    def _take_logprobs(self) -> list[dict] | None:
        if not self.params.logprobs:
            return None
        out, self.logprobs = self.logprobs, []
        return out

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._send(error)

    def _send(self, item) -> None:
        # The worker thread must not touch the asyncio queue directly.
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self.cancelled = True


class RowSampler(LogitsProcessor):
    """Chooses every row's next token with that row's own settings, then hands generate a one-hot.

    generate runs greedy (do_sample=False) over the result, so it picks exactly the token
    chosen here: this is how one batch mixes greedy and sampled rows, temperatures,
    top_p, repetition penalties and per-request seeds.
    """

    def __init__(self, requests: list[Request], pads: list[int], device: torch.device) -> None:
        params = [r.params for r in requests]
        self.requests = requests
        self.pads = pads
        self.width = len(requests[0].prompt_ids) + pads[0]  # generated tokens start at this column
        self.presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
        self.any_counted = any(p.presence_penalty or p.frequency_penalty for p in params)
        self.biased = [i for i, p in enumerate(params) if p.logit_bias]
        self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        self.params = params
        self.generators = {i: _generator(params[i].seed, device) for i in self.sampled}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raw = scores
        if self.any_penalty:
            scores = self._penalize(input_ids, scores)
        if self.any_counted:
            scores = self._presence_frequency(input_ids, scores)
        if self.biased:
            scores = self._bias(scores)
        scores = self._constrain(scores)
        choice = scores.argmax(dim=-1)
        for i in self.sampled:
            p = self.params[i]
            probs = _top_p(torch.softmax(scores[i].float() / p.temperature, dim=-1), p.top_p)
            choice[i] = torch.multinomial(probs, 1, generator=self.generators[i])[0]
        self._after_choice(raw, choice)
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter_(1, choice.unsqueeze(1), 0.0)

    def _presence_frequency(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # OpenAI's rule, on the reply's tokens only: logit -= count * frequency + (count > 0) * presence
        generated = input_ids[:, self.width:]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence

    def _bias(self, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for i in self.biased:
            for token, value in self.params[i].logit_bias.items():
                if token < scores.shape[1]:
                    scores[i, token] += value
        return scores

    def _constrain(self, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Rows with a grammar (response_format json) keep only the tokens it allows next."""
        from sage_ray.serve.engines.grammar import allowed_tokens

        rows = [i for i, r in enumerate(self.requests) if r.matcher is not None and not r.done]
        if not rows:
            return scores
        scores = scores.clone()
        for i in rows:
            allowed = allowed_tokens(self.requests[i].matcher, scores.shape[1]).to(scores.device)
            if not allowed.any():
                self.requests[i].fail(EngineError(f"constrained decoding is stuck: {self.requests[i].matcher.get_error()}"))
                continue
            scores[i] = scores[i].masked_fill(~allowed, float("-inf"))
        return scores

    def _after_choice(self, raw: torch.FloatTensor, choice: torch.LongTensor) -> None:
        """Advance each row's grammar by its token; record the token's logprobs where asked."""
        for i, request in enumerate(self.requests):
            if request.done:
                continue
            token = int(choice[i])
            if request.matcher is not None:
                request.matcher.consume_token(token)
            if request.params.logprobs:
                request.step_logprobs = _logprob_entry(request, raw[i], token)


def _logprob_entry(request: Request, logits: torch.FloatTensor, token: int) -> dict:
    """OpenAI's logprobs entry of `token`, from the model's raw distribution (as vLLM's default)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    decode = request.decoder.tokenizer.decode

    def item(token_id: int, value: float) -> dict:
        return {"token": decode([token_id]), "logprob": value, "bytes": list(request.token_bytes(token_id))}

    entry = item(token, float(logprobs[token]))
    top = request.params.top_logprobs
    if top:
        values, ids = logprobs.topk(top)
        entry["top_logprobs"] = [item(int(t), float(v)) for v, t in zip(values, ids)]
    else:
        entry["top_logprobs"] = []
    return entry

    def _penalize(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # Same rule as transformers' RepetitionPenaltyLogitsProcessor, but per row and
        # blind to the left padding (pad positions repeat the row's first real token).
        ids = input_ids.clone()
        for row, pad in enumerate(self.pads):
            if pad:
                ids[row, :pad] = ids[row, pad]
        picked = torch.gather(scores, 1, ids)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, ids, picked)


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    # Drop a token when the tokens before it already reach top_p; the first always stays.
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


class RowsDone(StoppingCriteria):
    """Per-row end: generate stops a row when its request is done, and the batch when all are."""

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([r.done for r in self.requests], device=input_ids.device)


class RowStreamer(BaseStreamer):
    """Receives each step's tokens for the whole batch and routes them to their requests."""

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests
        self.seen_prompt = False
        self.steps = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate first sends the prompt ids
            self.seen_prompt = True
            return
        self.steps += 1
        for request, token in zip(self.requests, value.reshape(-1).tolist()):
            if not request.done:
                request.on_token(token)

    def end(self) -> None:
        # generate stopped for a reason of its own (its max_new_tokens): close what is open.
        for request in self.requests:
            request.finish("length")


def run_batch(model, requests: list[Request], *, pad_id: int, adapter_names: list[str] | None,
              device: torch.device) -> int:
    """Generate for `requests` (prepared) as one left-padded batch; returns the decoding steps run."""
    width = max(len(r.prompt_ids) for r in requests)
    pads = [width - len(r.prompt_ids) for r in requests]
    input_ids = torch.tensor([[pad_id] * pad + r.prompt_ids for r, pad in zip(requests, pads)], device=device)
    attention_mask = torch.tensor([[0] * pad + [1] * len(r.prompt_ids) for r, pad in zip(requests, pads)],
                                  device=device)
    streamer = RowStreamer(requests)
    # generate fills unset fields from the artifact's generation_config: pin the ones that
    # would add logits processors of their own (RowSampler alone decides the token), and
    # its eos (an empty list, not None, which would be filled): each Request ends its row
    # on its own stop ids, which differ per adapter tokenizer and ignore_eos.
    config = GenerationConfig(max_new_tokens=max(r.max_new for r in requests), do_sample=False,
                              pad_token_id=pad_id, eos_token_id=[], repetition_penalty=1.0,
                              no_repeat_ngram_size=0, min_length=0)
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                       logits_processor=LogitsProcessorList([RowSampler(requests, pads, device)]),
                       stopping_criteria=StoppingCriteriaList([RowsDone(requests)]),
                       streamer=streamer, **extra)
    return streamer.steps
