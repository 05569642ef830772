"""Checks of the caller's input, each in one place: ``decode`` / ``Engine``, the CLI and the server call them at
the API boundary, and the model layer (``CausalLM.prefill``) and the remote client (``RemoteLM.complete``) for
what their direct callers can get wrong.

Every check raises ``InputError`` (a ``ValueError``) whose message names the argument, the value given and
what is allowed, before any model runs. The rules:

* prompts: a list of strings (needs a tokenizer) or a list of token-id lists (lists, tuples or 1-D integer
  tensors), not both; no ``None``, no flat id list, no empty prompt; ids are integers (not floats, strings or
  bools) in ``[0, vocab_size)``;
* numbers: finite, of the right type (``top_k=2.5`` is not an integer, ``True`` is not a count) and in range;
  a method option is checked against the type its ``run`` function declares, and an unknown option is an error
  that lists the method's options;
* ``seed``: an integer in ``[0, 2**64)``, or one such integer per prompt (``None``: fresh entropy, where allowed);
* flags (``chat``, ``compile``, ``static_cache``, ``trust_remote_code``, boolean method options): ``True`` or
  ``False`` only; a string such as ``"no"`` is truthy to Python and would switch the flag on;
* texts (prompts, chat messages): valid Unicode (no lone surrogates, which no tokenizer can encode);
* models: a model, a name or a path (a tokenizer given as a model is named as such);
* ``dtype``: a torch floating dtype or a name (``"float16"``, alias ``"fp16"``, ...); ``device``: one torch knows
  and this machine has;
* rewards: every call of a reward returns one finite number per (prompt, response) pair. A NaN or infinite
  reward is an error naming the prompt (``NonFiniteReward``), never a silent winner or an endless rejection loop;
* context lengths: each model's (by role) must hold the longest prompt plus ``max_new_tokens``, and a model
  never writes a token past its context length.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from contextlib import contextmanager

import torch


from .errors import InputError, NonFiniteReward  # noqa: F401  (re-exported: fastalign.validation.InputError)


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------- numbers
def is_int(value) -> bool:
    """An integer, not a bool (``True`` is an int to Python, never a count to a caller)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, optional: bool = False):
    """``value`` as an ``int`` in ``[minimum, maximum]`` (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return None
    if not is_int(value):
        kind = "an integer" + (" or None" if optional else "")
        raise InputError(f"{name} must be {kind}, got {_show(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "" if minimum is None else f">= {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise InputError(f"{name} must be an integer {' and '.join(s for s in (low, high) if s)}, got {value}")
    return value


def check_float(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
                optional: bool = False, hint: str = ""):
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` when ``low_open``; ``None`` allowed
    when ``optional``)."""
    if value is None and optional:
        return None
    if not is_real(value) or not math.isfinite(value):
        kind = "a finite number" + (" or None" if optional else "")
        raise InputError(f"{name} must be {kind}, got {_show(value)}")
    value = float(value)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise InputError(f"{name} must be in {interval}, got {value}{hint}")
    return value


def check_bool(name: str, value, optional: bool = False):
    """``value`` when it is ``True`` or ``False`` (or ``None`` when ``optional``): a flag given as ``"no"``,
    ``0`` or ``"false"`` is refused, never read as its Python truth value."""
    if (value is None and optional) or isinstance(value, bool):
        return value
    raise InputError(f"{name} must be True or False{' or None' if optional else ''}, got {_show(value)}")


def check_sampling(temperature, top_k, top_p) -> None:
    check_float("temperature", temperature, low=0.0, low_open=True, hint=" (use top_k=1 for greedy)")
    check_int("top_k", top_k, minimum=1, optional=True)
    check_float("top_p", top_p, low=0.0, high=1.0, low_open=True, optional=True)


SEED_LIMIT = 2**64


def check_seed(seed, num_prompts: int | None = None, optional: bool = True) -> int | list[int] | None:
    """An integer in ``[0, 2**64)``, or a list (tuple, 1-D tensor) of such integers, one per prompt; ``None``
    (fresh entropy) when ``optional``. Returns the seed as an ``int``, a ``list[int]`` or ``None``."""
    if (seed is None and optional) or is_int(seed):
        return None if seed is None else check_int("seed", seed, 0, SEED_LIMIT - 1)
    if isinstance(seed, (list, tuple)) or (torch.is_tensor(seed) and seed.dim() == 1):
        seeds = [check_int(f"seed[{i}]", s, 0, SEED_LIMIT - 1)
                 for i, s in enumerate(seed.tolist() if torch.is_tensor(seed) else seed)]
        if num_prompts is not None and len(seeds) != num_prompts:
            raise InputError(f"seed has {len(seeds)} values for {num_prompts} prompts: give one integer, or one "
                             "per prompt")
        return seeds
    allowed = "None, an integer" if optional else "an integer"
    raise InputError(f"seed must be {allowed} in [0, 2**64) or one such integer per prompt, got {_show(seed)}")


# ------------------------------------------------------------------------------------------- prompts
def check_text(name: str, text: str) -> str:
    """``text`` when it is valid Unicode: a lone surrogate (e.g. from undecodable bytes on a command line,
    which Python keeps as ``"\\udcff"``) cannot be encoded by any tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{name} is not valid Unicode text: it holds a lone surrogate {text[e.start]!r} at "
                         f"position {e.start} (undecodable bytes?)") from None
    return text


def _is_id_sequence(p) -> bool:
    return (isinstance(p, (list, tuple)) or (torch.is_tensor(p) and p.dim() == 1)
            or (type(p).__name__ == "ndarray" and p.ndim == 1))


def _token_id(t, where: str, vocab_size: int | None, model: str) -> int:
    if not is_int(t):
        raise InputError(f"{where}: token ids must be integers, got {_show(t)}")
    if t < 0 or (vocab_size is not None and t >= vocab_size):
        allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise InputError(f"{where}: token id {t} is outside the vocabulary of the {model} (ids {allowed})")
    return int(t)


def _token_ids(i: int, p, vocab_size: int | None, model: str, label: str = "prompt",
               allow_empty: bool = False) -> list[int]:
    if torch.is_tensor(p) or type(p).__name__ == "ndarray":
        integral = (not (p.is_floating_point() or p.is_complex() or p.dtype == torch.bool) if torch.is_tensor(p)
                    else p.dtype.kind in "iu")
        if not integral:
            raise InputError(f"{label} {i}: token ids must be integers, got an array of {p.dtype}")
        p = p.tolist()
    if set(map(type, p)) <= {int} and (not p or min(p) >= 0 and (vocab_size is None or max(p) < vocab_size)):
        ids = list(p)  # the common case, at C speed: plain ints, all in range
    else:
        ids = [_token_id(t, f"{label} {i}, position {j}", vocab_size, model) for j, t in enumerate(p)]
    if not ids and not allow_empty:
        raise InputError(f"{label} {i} is empty")
    return ids


def check_prompts(prompts, tokenizer=None, vocab_size: int | None = None, model: str = "target") -> list[list[int]]:
    """The prompts as token-id lists (strings through ``tokenizer``), every id checked against ``vocab_size``."""
    what = "prompts must be a list of strings or a list of token-id lists"
    if prompts is None or isinstance(prompts, (str, bytes, dict, set, frozenset)):  # (a set has no order to answer in)
        raise InputError(f"{what}, got {_show(prompts)}")
    if torch.is_tensor(prompts) and prompts.dim() == 2:
        prompts = list(prompts)
    elif torch.is_tensor(prompts):
        raise InputError(f"{what}; a tensor of prompts must be 2-D [prompts, tokens], got shape "
                         f"{list(prompts.shape)}")
    try:
        prompts = list(prompts)
    except TypeError:
        raise InputError(f"{what}, got {_show(prompts)}") from None
    if not prompts:
        raise InputError("no prompts given")
    if all(is_int(p) for p in prompts):
        raise InputError(f"prompts is a flat list of token ids {_show(prompts)}: pass a list of prompts, "
                         f"e.g. [{_show(prompts, 40)}]")
    texts = [isinstance(p, str) for p in prompts]
    for i, p in enumerate(prompts):
        if not (isinstance(p, str) or _is_id_sequence(p)):
            raise InputError(f"prompt {i} must be a string or a list of token ids, got {_show(p)}")
    if any(texts) and not all(texts):
        raise InputError(f"prompts mix text (prompt {texts.index(True)}) and token ids (prompt {texts.index(False)}): "
                         "pass all prompts as strings or all as token-id lists")
    if all(texts):
        if tokenizer is None:
            raise InputError("text prompts need a tokenizer (pass tokenizer=...) or pass token ids")
        prompts = [tokenizer(check_text(f"prompt {i}", p))["input_ids"] for i, p in enumerate(prompts)]
    return [_token_ids(i, p, vocab_size, model) for i, p in enumerate(prompts)]


def check_token_rows(name: str, rows, vocab_size: int | None = None, model: str = "model",
                     allow_empty: bool = False) -> list[list[int]]:
    """A JSON-style list of token-id lists (e.g. the responses sent to a reward server), each id checked."""
    if not isinstance(rows, list) or not all(_is_id_sequence(r) for r in rows):
        raise InputError(f"{name} must be a list of token-id lists, got {_show(rows)}")
    label = name[:-1] if name.endswith("s") else name  # "responses" -> "response 3, position 0: ..."
    return [_token_ids(i, r, vocab_size, model, label, allow_empty) for i, r in enumerate(rows)]


def check_positions(needed: int, limit, model: str = "the model", what: str = "a sequence", why: str = "") -> None:
    """``needed`` positions fit in a context of ``limit`` (``None`` or not positive: unknown, not checked).
    ``model`` and ``what`` name the model and the sequence in the message; ``why`` says where the limit comes
    from, when not from the model's positions."""
    if is_int(limit) and limit > 0 and needed > limit:
        raise InputError(f"{what} needs {needed} positions, more than the context length of {model} ({limit}"
                         f"{': ' + why if why else ''})")


def check_context_length(prompts: list[list[int]], max_new_tokens, limit, model: str = "the model",
                         why: str = "") -> None:
    """Every prompt plus its ``max_new_tokens`` (an int, or one per prompt) fits in ``limit`` positions; the
    message names the prompt that needs the most (the first such)."""
    budgets = [max_new_tokens] * len(prompts) if is_int(max_new_tokens) else list(max_new_tokens)
    needs = [len(p) + m for p, m in zip(prompts, budgets)]
    if not needs:
        return
    worst = max(range(len(needs)), key=needs.__getitem__)
    check_positions(needs[worst], limit, model,
                    f"prompt {worst} has {len(prompts[worst])} tokens; with max_new_tokens={budgets[worst]} it", why)


def check_context_lengths(models: dict, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Every model (``role -> model`` with a ``context_length``) holds the longest prompt plus ``max_new_tokens``."""
    for role, model in models.items():
        check_context_length(prompts, max_new_tokens, getattr(model, "context_length", None), f"the {role} model",
                             getattr(model, "context_why", ""))


def check_rows(given: int, cached: int) -> None:
    """A block written to a cache has one row per cached row (``extend`` after ``prefill`` of another batch)."""
    if given != cached:
        raise InputError(f"batch of {given} rows given to a cache of {cached} rows")


# ------------------------------------------------------------------------------------ method options
_INT_TUPLE = "tuple[int, ...]"  # e.g. sd / sss ``branching``
_SIMPLE_TYPES = {"int", "float", "bool", "str", "None", _INT_TUPLE}
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string",
               _INT_TUPLE: "a tuple of integers such as (2, 2)", "None": "None"}


def _allowed_types(annotation) -> set[str] | None:
    """The simple types an option's annotation allows (``"float | None"`` -> {float, None}); None when the
    annotation is missing or names anything else (then only finiteness is checked)."""
    if annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = {part.strip() for part in text.split("|")}
    return kinds if kinds <= _SIMPLE_TYPES else None


def _matches(value, kinds: set[str]) -> bool:
    """Whether ``value`` is of one of ``kinds``; a bool is never a number and a number never a bool."""
    if isinstance(value, (tuple, list)):
        return _INT_TUPLE in kinds and all(is_int(v) for v in value)
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if is_int(value):
        return bool({"int", "float"} & kinds)
    if is_real(value):
        return "float" in kinds
    return isinstance(value, str) and "str" in kinds


def _non_finite(value) -> bool:
    if is_real(value):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def check_method_options(method: str, run, options: dict) -> dict:
    """Every option is one that ``run`` takes, of the type it declares, and finite where it is a number.
    Returns the options with integers of any kind (NumPy's, within tuples too) as Python ints, which the
    methods' own checks expect."""
    def plain(value):
        if is_int(value):
            return int(value)
        return tuple(map(plain, value)) if isinstance(value, tuple) else value

    options = {name: plain(value) for name, value in options.items()}
    params = {name: p for name, p in inspect.signature(run).parameters.items() if name not in ("ctx", "prompts")}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise InputError(f"method {method!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(params) or 'none'}")
    for name, value in options.items():
        if _non_finite(value):
            raise InputError(f"{method} option {name} must be finite, got {_show(value)}")
        kinds = _allowed_types(params[name].annotation)
        if kinds is not None and not _matches(value, kinds):
            allowed = " or ".join(name for kind, name in _TYPE_NAMES.items() if kind in kinds)
            raise InputError(f"{method} option {name} must be {allowed}, got {_show(value)}")
    check_option_ranges(method, options)
    return options


# Finite numbers whose magnitude overflows the methods' float32 arithmetic (a raw overflow error, or special
# tokens from inf / nan logits): method -> option -> (largest magnitude, the option's range, why).
REWARD_LIMIT = 3.4e38  # about the float32 maximum (3.4028e38)
TILT_LIMIT = 1e6  # sss: keeps lam * (log q_r - log q) finite in float32, even at the temperature floor
OPTION_LIMITS = {
    "sss": {"lam": (TILT_LIMIT, "[-1e6, 1e6]", "a larger tilt overflows float32"),
            "max_log_ratio": (TILT_LIMIT, "(0, 1e6]", "a larger clip overflows float32")},
    **{method: {"reward_threshold": (REWARD_LIMIT, "[-3.4e38, 3.4e38] or 'auto'", "rewards are float32"),
                "accept_beta": (REWARD_LIMIT, "(0, 3.4e38] or 'auto'", "rewards are float32")}
       for method in ("rs", "cards")},
}


def check_option_ranges(method: str, options: dict) -> None:
    """Numeric method options no larger in magnitude than their method computes safely in float32
    (``OPTION_LIMITS``); the rest of an option's range (its sign, ``"auto"``) is checked by the method."""
    for name, (limit, allowed, why) in OPTION_LIMITS.get(method, {}).items():
        value = options.get(name)
        if is_real(value) and math.isfinite(value) and abs(value) > limit:
            raise InputError(f"{method} option {name} must be in {allowed} ({why}), got {value:g}")


# ------------------------------------------------------------------------------------- dtype, device
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def check_dtype(dtype):
    """``None`` / ``"auto"`` as given, else a floating ``torch.dtype`` (names and aliases such as ``"fp16"``)."""
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point:
            return dtype
    elif isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
    raise InputError(f"dtype must be 'auto', a floating torch dtype or one of {sorted(DTYPE_NAMES)}, "
                     f"got {_show(dtype)}")


def check_device(device):
    """``None`` or a device torch knows and this machine has (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {_show(device)}") \
            from None
    if parsed.type == "meta":  # shapes without data: a model there cannot compute a single token
        raise InputError(f"device {_show(device)} holds no data (shapes only); give a device that computes, "
                         "such as 'cpu' or 'cuda'")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise InputError(f"device {_show(device)} is not available on this machine "
                             f"({count} CUDA device{'s' if count != 1 else ''})")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {_show(device)} is not available on this machine")
    return device


def check_not_tokenizer(role: str, spec) -> None:
    """A tokenizer given for a model (``role``) is named as such; being callable, it would otherwise pass for
    a reward function. (Recognised by its base class's name: no transformers import here.)"""
    if any(c.__name__ == "PreTrainedTokenizerBase" for c in type(spec).__mro__):
        raise InputError(f"{role} is a tokenizer ({type(spec).__name__}); pass it as tokenizer=... and the model "
                         f"as {role}=...")


def check_model(role: str, spec, accepted: tuple = ()):
    """``spec`` when it can be a causal LM for ``role``: ``None``, a name or path, a ``torch.nn.Module`` or an
    instance of ``accepted`` (fastalign's own wrappers)."""
    check_not_tokenizer(role, spec)
    if spec is None or isinstance(spec, (str, os.PathLike, torch.nn.Module, *accepted)):
        return spec
    raise InputError(f"{role} must be a model: an HF model object, a name, a local folder or a .gguf file, got "
                     f"a {type(spec).__name__}")


@contextmanager
def loading(role: str, spec):
    """Loading a model or tokenizer named by ``spec``: a failure (missing path, unknown name, offline Hub) is an
    ``InputError`` naming the role and the name, in one line."""
    try:
        yield
    except InputError:
        raise
    except (OSError, ValueError, ImportError) as e:
        if not isinstance(spec, str):
            raise
        path_like = spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1  # a Hub id has one /
        if path_like and not os.path.exists(os.path.expanduser(spec)):
            reason = "no such file or folder"
        else:
            lines = str(e).strip().splitlines()
            reason = lines[0] if lines else type(e).__name__
        raise InputError(f"cannot load the {role} {spec!r}: {reason}") from None


# ------------------------------------------------------------------------------------------- rewards
def check_rewards(values, prompts: list, what: str = "the reward") -> torch.Tensor:
    """One finite fp32 reward per ``prompts`` row (``[N]`` or ``[N, 1]`` accepted), on the CPU.

    A reward that is NaN or infinite raises ``NonFiniteReward`` naming the row's prompt: a reward has no
    meaningful order with NaN (it would win ``bon`` or stall ``rs``/``cards``), so it is never used.
    """
    n = len(prompts)
    try:
        values = torch.as_tensor(values).detach()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} returned {_show(values)}; expected {n} numbers, one per (prompt, response)") \
            from None
    if values.is_complex() or values.dtype == torch.bool or not (values.dim() == 1 or values.dim() == 2
                                                                 and values.shape[1] == 1) \
            or values.shape[0] != n:
        raise InputError(f"{what} returned a {values.dtype} tensor of shape {list(values.shape)} for {n} "
                         f"(prompt, response) pairs; expected shape [{n}] (one real number per pair)")
    given = values.reshape(n).cpu()  # one copy to the host
    values = given.float()
    bad = (~torch.isfinite(values)).nonzero()
    if bad.numel():
        row = int(bad[0])
        shown = float(given[row])  # (as returned: a float64 1e300 is finite, and overflows float32)
        why = "rewards must be finite float32 numbers" + (f" (|r| <= {REWARD_LIMIT:g})" if math.isfinite(shown) else "")
        raise NonFiniteReward(f"{what} is {shown:g} for prompt {_show(list(prompts[row]), 50)} "
                              f"(row {row} of {n}); {why}", list(prompts[row]))
    return values


def check_scores(what: str, values, n: int) -> list[float]:
    """``values`` (a sequence or tensor of ``n`` numbers, e.g. what a gold reward returned) as ``n`` Python
    floats, read in float64; strings, ``None`` or a wrong count are an ``InputError`` naming ``what``."""
    try:
        scores = torch.as_tensor(values, dtype=torch.float64).flatten().tolist()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} returned {_show(values)}; expected {n} numbers, one per (prompt, response)") \
            from None
    if len(scores) != n:
        raise InputError(f"{what} returned {len(scores)} scores for {n} responses")
    return scores
