"""A tiny random Qwen2 chat model with a real BPE tokenizer, built offline in seconds.

Tests and the CPU demo path need a model that behaves like a real one (fast tokenizer,
chat template, eos, safetensors) without any download. The weights are random; the
tokenizer is trained on a small English corpus embedded below, so ids are stable.
"""

from __future__ import annotations

from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VOCAB_SIZE = 1000

# Qwen2.5's template shape (no default system message): any role, ChatML framing. With
# `tools` it renders them into the system turn, assistant `tool_calls` as <tool_call> blocks
# and consecutive `tool` results as one user turn of <tool_response> blocks, as Qwen2.5 does;
# without tools the text is plain ChatML.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{- '<|im_start|>assistant' }}{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}{%- set call = call.get('function', call) %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' + (call['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model learns from examples, and a good
dataset has clear questions and helpful answers. Fine-tuning adapts a pretrained model
to a new task with a small number of steps, while LoRA trains only a few low-rank
matrices and keeps the base weights frozen.
What is the capital of France? The capital of France is Paris. Where is the Eiffel
Tower? It is in Paris, the largest city of France. How many days are in a week? There
are seven days in a week. Who wrote this answer? The assistant wrote it for the user.
You are a helpful assistant. Please explain your reasoning step by step, then give the
final answer. Thank you! Sure, here is a short summary of the document you shared.
The system message sets the behaviour; the user asks and the assistant replies.
def add(a, b):
    return a + b

class Trainer:
    def __init__(self, config):
        self.config = config
        self.step = 0

    def train(self, data):
        for batch in data:
            loss = self.model(batch).loss
            loss.backward()
            self.step += 1
        return {"loss": float(loss), "step": self.step}

import json, os
with open("dataset.json") as f:
    rows = json.load(f)
print(f"{len(rows)} rows, first: {rows[0]['instruction']}")
if x is None or not isinstance(x, list): raise ValueError("expected a list")
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name;
const total = items.map((item) => item.price * 2).filter(Boolean);
{"instruction": "Translate to French", "input": "Good morning", "output": "Bonjour"}
{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1e-4 0.001 -7 50% $19.99
Café, naïve, résumé, über, señor, 東京, Привет, 😀 — “quotes” and ‘apostrophes’…
"""

_WORDS = """the of and to in is that for it as was with be by on not he this are or his
from at which but have an they you were her she there one all we their has been would
can if will what when who how why where your question answer instruction input output
response user assistant system message content role model data train training loss
learning rate epoch batch step token tokens text code function return value list dict
string number error file path python model config true false none import class self
print example context summary explain write translate please help thanks hello good
yes no because then also more most some other about into than only new time just like
"""


def _train_tokenizer():
    """Train a byte-level BPE with exactly Qwen2's normaliser and pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # For a Qwen2 config AutoTokenizer rebuilds Qwen's own normaliser and split regex on
    # reload, so training with anything else would change the ids after a reload.
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    # Repeating the word list gives common words their own token, like a real vocab.
    tok.train_from_iterator([_CORPUS] + [_WORDS] * 8, trainer=trainer)
    return tok


def build_tokenizer():
    """The tiny model's fast tokenizer, as the `Qwen2Tokenizer` a reload gives back."""
    import json

    from transformers import Qwen2Tokenizer

    # Built from vocab + merges through Qwen2Tokenizer so the object returned here and
    # the one AutoTokenizer reloads have the same class, pipeline and saved config.
    bpe = json.loads(_train_tokenizer().to_str())["model"]
    return Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(m) for m in bpe["merges"]],
        unk_token=None,  # byte-level: every input is encodable, as in Qwen2.5
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(dest: Path, *, seed: int = 0) -> Path:
    """Write a random tiny Qwen2ForCausalLM, its tokenizer and generation config to `dest`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    dest = Path(dest)
    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
