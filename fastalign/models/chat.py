"""Chat prompts: conversations rendered with the tokenizer's chat template, and the end-of-turn token.

A conversation is a list of ``{"role": ..., "content": ...}`` messages (as QAlign's and most chat APIs take
them). ``render`` turns conversations into token ids with the tokenizer's chat template and
``add_generation_prompt=True``, so the model's response starts right after the prompt. An instruct model ends
its turn with a token of its template (``<|im_end|>`` for ChatML models such as SmolLM2, ``<end_of_turn>`` for
Gemma); ``end_of_turn_ids`` finds it by rendering a conversation that ends with an assistant message.
"""

from __future__ import annotations

from ..errors import InputError
from ..validation import check_text

_MARK = "\u2063fastalign-end-of-turn-probe\u2063"  # a reply text that no template alters


def is_conversation(prompt) -> bool:
    """True for a list of messages (dicts); a plain string or a token-id list is not a conversation."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


def _check_conversation(conversation, index: int) -> list[dict]:
    for j, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise InputError(f"prompt {index}, message {j}: expected a dict with string 'role' and 'content', "
                             f"got {message!r}")
        check_text(f"prompt {index}, message {j}", message["content"])
    return list(conversation)


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def render(tokenizer, conversations: list) -> list[list[int]]:
    """Token ids of each conversation under the tokenizer's chat template, ending with the generation prompt.

    A plain string counts as one user message. The template decides about special tokens (BOS and the like);
    none are added on top. A template that fails on a conversation (a Jinja error, ``raise_exception``) is an
    ``InputError`` naming the prompt, its error chained.
    """
    if tokenizer is None:
        raise InputError("chat prompts need a tokenizer (pass tokenizer=...)")
    if not has_chat_template(tokenizer):
        raise InputError("chat prompts need a tokenizer with a chat template; this tokenizer has none "
                         "(set tokenizer.chat_template, or pass plain prompts without chat=True)")
    out = []
    for i, conversation in enumerate(conversations):
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        elif not is_conversation(conversation):
            raise InputError(f"prompt {i}: a chat prompt is a string or a list of {{'role', 'content'}} messages, "
                             f"got {type(conversation).__name__}")
        messages = _check_conversation(conversation, i)
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # the template is code from the tokenizer's files (Jinja), e.g. raise_exception
            raise InputError(f"prompt {i}: the tokenizer's chat template failed on it ({type(err).__name__}: "
                             f"{err})") from err
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding here
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


def end_of_turn_ids(tokenizer) -> set[int]:
    """The special token the chat template puts right after an assistant's reply (empty if none, or no template).

    The template renders a conversation ending in an assistant message whose text is a marker; the first token
    of what follows the marker is the end-of-turn token when it is a special (added) token of the tokenizer.
    """
    if not has_chat_template(tokenizer):
        return set()
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that rejects this conversation shape: no end-of-turn token known
        return set()
    _, found, rest = text.partition(_MARK)
    if not found or not rest:
        return set()
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return {int(ids[0])} if ids and ids[0] in special else set()
