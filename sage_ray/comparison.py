"""`sage finetune compare`: a candidate and another model answer the same held-out prompts.

Both models answer each prompt greedily, and each one's loss on the reference reply (the
record's last assistant turn, scored like training scores it) is measured. The model work
runs as a Ray task with CPUs reserved on the head node, where the task folders are (as
`jobs.merge` does) and streams its progress back (a Ray streaming generator): the caller
(CLI, Studio ingress thread, Studio page) shows it and gets the result at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from sage_ray.config import ConfigError
from sage_ray.data import Example, load_dataset
from sage_ray.errors import SageError

COMPARE_CPUS = 1
MAX_EXAMPLES = 32  # held-out prompts compared by default: each costs a generation per model
MAX_NEW_TOKENS = 64
MAX_LIMIT = 1000


class CompareError(SageError):
    """A comparison that cannot run (no held-out set, no prompts with references)."""

    http_status = 400


def held_out_examples(meta: dict[str, Any]) -> list[Example]:
    """The records a finished task held out from training: its val_data file, or its split."""
    from sage_ray.data.split import split_records

    config = meta.get("config") or {}
    if config.get("val_data"):
        return load_dataset(config["val_data"]).examples
    fraction = config.get("validation_split") or 0.0
    if not fraction:
        raise CompareError(f"task {meta['task_id']!r} held nothing out (validation_split 0, no val_data): "
                           "pass a prompts file (--prompts FILE, or \"prompts\" in the request) with references")
    return split_records(load_dataset(config["data"]).examples, fraction, config.get("seed", 42))[1]


def prompt_and_reference(example: Example) -> tuple[list[dict], str] | None:
    """(the conversation before the last assistant turn, that turn's text); None without one."""
    messages = example.messages or []
    if not messages or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
        return None
    return messages[:-1], messages[-1]["content"]


def cases(examples: list[Example], limit: int) -> list[tuple[list[dict], str]]:
    found = [pair for pair in map(prompt_and_reference, examples) if pair is not None]
    if not found:
        raise CompareError("no record has a final assistant reply to compare against: give records in a chat, "
                           "alpaca or qa format (a 'text' record has no prompt/reply split)")
    return found[:limit]


def normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def summarise(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per model: token-weighted mean loss on the references, exact-match and contains-reference rates."""
    tokens = sum(row[key]["tokens"] for row in rows)
    return {
        "mean_loss": round(sum(row[key]["loss"] * row[key]["tokens"] for row in rows) / tokens, 4) if tokens else None,
        "exact_match": round(sum(row[key]["exact_match"] for row in rows) / len(rows), 4),
        "contains_reference": round(sum(row[key]["contains_reference"] for row in rows) / len(rows), 4),
    }


def score_model(spec: dict[str, Any], pairs: list[tuple[list[dict], str]], max_length: int,
                max_new_tokens: int) -> Iterator[dict[str, Any]]:
    """One model's greedy answer and reference loss for each (prompt, reference), one at a time."""
    import torch

    from sage_ray.data.tokenize import IGNORE_INDEX, tokenize_example

    model, tokenizer = load_for_scoring(spec)
    with torch.no_grad():
        for prompt, reference in pairs:
            item = tokenize_example(tokenizer, Example(messages=prompt + [{"role": "assistant", "content": reference}]),
                                    max_length=max_length)
            labels = torch.tensor([item.labels])
            scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss = model(input_ids=torch.tensor([item.input_ids]), labels=labels).loss.item() if scored else 0.0
            inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            yield {"output": answer, "loss": round(loss, 4), "tokens": scored,
                   "exact_match": normalised(answer) == normalised(reference),
                   "contains_reference": normalised(reference) in normalised(answer)}


def load_for_scoring(spec: dict[str, Any]):
    """(model, tokenizer) of a ModelSpec as a dict: a full model, or a LoRA on its base."""
    from transformers import AutoModelForCausalLM

    from sage_ray.data.tokenize import load_tokenizer

    if spec["kind"] == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(spec["base_path"])
        model = PeftModel.from_pretrained(base, spec["path"])
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["path"])
    return model.eval(), load_tokenizer(spec["path"])


def load_source(source: dict[str, Any]) -> list[Example]:
    """The records to compare on: {"prompts": file} or {"task": id, "home": SAGE_HOME} (its held-out set)."""
    from sage_ray.paths import TaskPaths
    from sage_ray.train.meta import read_meta

    if source.get("prompts"):
        return load_dataset(source["prompts"]).examples
    try:
        meta = read_meta(TaskPaths(source["task"], root=Path(source["home"]) / "studio_finetune"))
    except FileNotFoundError as err:
        raise CompareError(str(err)) from None
    return held_out_examples(meta)


def compare_on_node(candidate: dict, against: dict, source: dict[str, Any], limit: int, max_length: int,
                    max_new_tokens: int) -> Iterator[dict[str, Any]]:
    """The Ray task's body, a generator: {"progress": ...} after each answer, then {"result": ...}
    (or {"error": message} for a user error, which the caller raises as CompareError)."""
    import torch

    torch.set_num_threads(COMPARE_CPUS)
    try:
        pairs = cases(load_source(source), limit)
    except (SageError, ValueError) as err:
        yield {"error": str(err)}
        return
    scored: dict[str, list[dict[str, Any]]] = {"candidate": [], "against": []}
    for key, spec in (("candidate", candidate), ("against", against)):
        for answer in score_model(spec, pairs, max_length, max_new_tokens):
            scored[key].append(answer)
            yield {"progress": {"done": len(scored["candidate"]) + len(scored["against"]), "total": 2 * len(pairs),
                                "model": spec["name"]}}
    rows = [{"prompt": prompt, "reference": reference, "candidate": a, "against": b}
            for (prompt, reference), a, b in zip(pairs, scored["candidate"], scored["against"])]
    yield {"result": {"candidate": candidate["name"], "against": against["name"], "examples": rows,
                      "summary": {"examples": len(rows), "candidate": summarise(rows, "candidate"),
                                  "against": summarise(rows, "against")}}}


def compare_events(candidate, against, source: dict[str, Any], *, limit: int = MAX_EXAMPLES,
                   max_length: int = 1024, max_new_tokens: int = MAX_NEW_TOKENS) -> Iterator[dict[str, Any]]:
    """Compare two ModelSpecs on `source` (see load_source) in a Ray task on the head node, where
    the task folders are: yields {"progress": {"done", "total", "model"}} as each answer is
    scored, then {"result": ...}; a user error raises CompareError. The arguments are checked
    at the call, before any event (a streamed answer has not started yet). Blocks between
    events (iterate it from a thread, never an event loop)."""
    if not 1 <= limit <= MAX_LIMIT or max_new_tokens < 1:
        raise ConfigError(f"field 'limit': {limit} must be from 1 to {MAX_LIMIT}, and max_new_tokens "
                          f"({max_new_tokens}) at least 1")
    as_dict = lambda spec: {"name": spec.name, "path": spec.path, "kind": spec.kind,  # noqa: E731
                            "base_path": spec.base_path}
    return _stream(as_dict(candidate), as_dict(against), source, limit, max_length, max_new_tokens)


def _stream(*args: Any) -> Iterator[dict[str, Any]]:
    import ray

    task = ray.remote(compare_on_node).options(num_cpus=COMPARE_CPUS, num_returns="streaming",
                                               resources={"node:__internal_head__": 0.001})
    for ref in task.remote(*args):
        event = ray.get(ref)
        if "error" in event:
            raise CompareError(event["error"])
        yield event


def result_of(events: Iterator[dict[str, Any]],
              on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The result of a comparison's events; `on_progress` gets each progress event on the way."""
    for event in events:
        if "result" in event:
            return event["result"]
        if on_progress is not None:
            on_progress(event["progress"])
    raise CompareError("the comparison ended without a result")


def compare(candidate, against, source: dict[str, Any], *,
            on_progress: Callable[[dict[str, Any]], None] | None = None, **options: Any) -> dict[str, Any]:
    """compare_events' result, blocking until it is there."""
    return result_of(compare_events(candidate, against, source, **options), on_progress)


def is_better(result: dict[str, Any]) -> bool:
    """The gate of a promotion: the candidate's held-out loss is strictly lower."""
    mine, theirs = result["summary"]["candidate"]["mean_loss"], result["summary"]["against"]["mean_loss"]
    return mine is not None and theirs is not None and mine < theirs
