"""Loading models and tokenizers from what the caller names: HF names, local folders, or ``.gguf`` files.

A ``.gguf`` file (llama.cpp's format) holds the weights and the tokenizer in one file; ``transformers``
reads it with the ``gguf`` package and *dequantises* the weights (to fp32 unless a ``dtype`` is given), so
the model runs like any other HF model. Loading a GGUF file converts every tensor and is slow (seconds for
a 135M model, minutes for large vocabularies on a busy CPU): ``convert_gguf`` saves the dequantised model
and its tokenizer once as an ordinary HF folder (``save_pretrained``), which then loads in a second.

    model = load_causal_lm("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    tokenizer = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # cached under ~/.cache/fastalign/gguf/
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import InputError


def is_gguf(spec) -> bool:
    """True for a path (string or ``Path``) that names a ``.gguf`` file."""
    return isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith(".gguf")


def _gguf_location(spec) -> tuple[str, str]:
    """``(folder, file name)`` of a GGUF file, as ``from_pretrained(folder, gguf_file=name)`` takes them."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"GGUF file not found: {path}")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise InputError(f"loading {path.name} needs the `gguf` package (pip install gguf accelerate)") from None
    return str(path.parent.resolve()), path.name


@contextmanager
def _reading_gguf(path: str | os.PathLike, role: str):
    """Reading a GGUF file with transformers: when that fails and the file itself does not parse (a truncated
    download, another format), an ``InputError`` naming ``role`` and the file; any other failure (a valid
    file of an unsupported architecture, say) is left as it is."""
    try:
        yield
    except Exception as err:
        if _gguf_parses(path):
            raise
        kind = type(err).__qualname__ if type(err).__module__ == "builtins" else \
            f"{type(err).__module__}.{type(err).__qualname__}"  # struct.error, not a bare "error"
        raise InputError(f"the {role} {str(path)!r} is not a complete GGUF file (truncated or corrupt): reading "
                         f"it failed with {kind}: {err}") from err


def _gguf_parses(path) -> bool:
    """Whether the ``gguf`` package reads the whole file: header, metadata and every tensor's data in bounds."""
    import gguf

    try:
        gguf.GGUFReader(path)
    except Exception:  # struct.error, ValueError, ...: whatever a malformed file makes the reader raise
        return False
    return True


def _clear_gguf_quantizer(model) -> None:
    """A GGUF-loaded model holds plain dequantised tensors, yet keeps the record of its GGUF origin, which makes
    ``save_pretrained`` refuse and a saved config claim a quantisation: drop the record."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def load_causal_lm(spec, trust_remote_code: bool = False, dtype=None, role: str = "model"):
    """An ``AutoModelForCausalLM`` from an HF name, a local folder or a ``.gguf`` file (eval mode); ``role``
    names the model in errors (``"target"``, ``"draft"``, ...)."""
    from transformers import AutoModelForCausalLM

    if is_gguf(spec):
        folder, name = _gguf_location(spec)
        with _reading_gguf(spec, role):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                         trust_remote_code=trust_remote_code)
        _clear_gguf_quantizer(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def load_reward_model(spec, trust_remote_code: bool = False, **kwargs):
    """A reward model from an HF name or a local folder: sequence classification, or token classification (a
    process reward model) where the saved architecture says so; ``kwargs`` go to ``from_pretrained``.

    Refused (``InputError``): a ``.gguf`` file (GGUF holds causal LMs, not classification heads), a model
    whose head is not in the checkpoint, e.g. a causal LM's folder: transformers would attach a freshly
    initialised head and only print a load report, and its rewards would be random; and weights whose shapes
    differ from the config's, e.g. a one-output head under a config that lists no labels (read as two)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    if is_gguf(spec):
        raise InputError(f"a reward model cannot be a .gguf file ({spec}): GGUF files hold causal LMs; give a "
                         "folder or Hub name of a sequence (or token) classification model")
    where = {k: kwargs[k] for k in ("cache_dir", "token") if k in kwargs}  # (the rest is the model's)
    config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code, **where)
    process = any(a.endswith("ForTokenClassification") for a in config.architectures or ())
    auto = AutoModelForTokenClassification if process else AutoModelForSequenceClassification
    try:
        model, info = auto.from_pretrained(spec, trust_remote_code=trust_remote_code, output_loading_info=True,
                                           **kwargs)
    except RuntimeError as error:  # transformers' size-mismatch refusal, its load report printed above it
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise InputError(f"{spec}: the checkpoint's weights do not fit its config.json (the load report above "
                         f"names them); for the reward head, config.json's num_labels (here {config.num_labels}, "
                         "two when it lists no labels) must be its number of outputs: 1 for a reward model, 2 "
                         "for a process reward model") from error
    head = {"score", "classifier"} & {key.split(".")[0] for key in info["missing_keys"]}
    if head:
        raise InputError(f"{spec} has no trained reward head ({head.pop()} would be random): it is not a reward "
                         "model saved for sequence or token classification")
    return model.eval()


def load_tokenizer(spec, trust_remote_code: bool = False, role: str = "tokenizer"):
    """A tokenizer from an HF name, a local folder or a ``.gguf`` file (which carries its own); other objects
    (already a tokenizer, or None) are returned as they are. ``role`` names the file in errors."""
    if spec is None or not isinstance(spec, (str, os.PathLike)):
        return spec
    from transformers import AutoTokenizer

    if is_gguf(spec):
        folder, name = _gguf_location(spec)
        with _reading_gguf(spec, role):
            return AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
    return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)


def cache_dir() -> Path:
    """Where fastalign keeps converted models: ``$FASTALIGN_CACHE`` or ``~/.cache/fastalign``."""
    return Path(os.environ.get("FASTALIGN_CACHE") or Path.home() / ".cache" / "fastalign")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(spec, out_dir: str | os.PathLike | None = None) -> Path:
    """Save the dequantised model (fp32) and tokenizer of a GGUF file as an HF folder, once; return the folder.

    The default folder is ``cache_dir() / "gguf" / "<file stem>-<sha256 prefix>"``, keyed by the file's
    contents, so a changed file converts again. The folder is written under a temporary name and renamed when
    complete, so an interrupted conversion is redone, never half used.
    """
    path = Path(spec).expanduser()
    _gguf_location(path)
    out = Path(out_dir) if out_dir is not None else cache_dir() / "gguf" / f"{path.stem}-{_sha256(path)[:16]}"
    if (out / "config.json").is_file():
        return out
    model = load_causal_lm(path, dtype=torch.float32)
    tokenizer = load_tokenizer(path)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    if (out / "config.json").is_file():  # converted meanwhile by another process
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
