"""Gemma 3 270M from PyPI (GGUF): a second real target, of another architecture than the Llama-style models
(sliding-window layers, a 262k vocabulary, a base model without a chat template), to check that nothing in
fastalign's model layer is Llama-specific: greedy equality with ``generate`` in a padded batch, and methods
that roll the cache back (cards) and expand it (qalign)."""

import pytest

import fastalign
from fastalign.testing import hf_greedy

pytestmark = pytest.mark.real

PROMPTS = ["My favourite food", "The best thing about living by the sea is",
           "Once upon a time, in a small village at the edge of a great forest, there lived"]


@pytest.fixture(scope="module")
def engine(gemma3):
    model, tokenizer = gemma3
    return fastalign.Engine(target=model, tokenizer=tokenizer, reward="vader")


def test_greedy_equals_generate_in_a_left_padded_batch(engine):
    prompts = engine.encode(PROMPTS)
    assert len({len(p) for p in prompts}) == len(prompts)
    expected = hf_greedy(engine.target.model, prompts, 32, engine.tokenizer.pad_token_id,
                         engine.target.eos_token_ids)
    got = engine.decode(prompts, method="sample", max_new_tokens=32, temperature=1.0, top_k=1, seed=0).sequences
    assert got == expected


def test_chat_prompts_need_a_chat_template(engine):
    with pytest.raises(fastalign.InputError, match="needs? a tokenizer with a chat template"):
        engine.encode(PROMPTS, chat=True)


@pytest.mark.parametrize("method,options", [("cards", {"max_rejections": 2, "min_segment_tokens": 2}),
                                            ("qalign", {"beta": 0.2, "steps": 2})])
def test_methods_with_rollback_and_expansion_run(engine, method, options):
    out = engine.decode(PROMPTS[:2], method=method, max_new_tokens=12, temperature=0.7, seed=0, **options)
    assert all(0 < len(s) <= 12 for s in out.sequences) and all(t.strip() for t in out.texts)
    assert out.stats["reward_calls"] > 0


def test_the_sliding_window_is_the_context_length(engine):
    """The sliding layers run as full attention, exact within the window (docs/internals.md, Limitations):
    Gemma 3 270M's 512 of its 32k positions, and a longer request is refused by name."""
    assert engine.target.sliding_window == 512 and engine.target.context_length == 512
    with pytest.raises(fastalign.InputError, match=r"context length of the target model \(512: the window"):
        engine.decode(PROMPTS[:1], method="sample", max_new_tokens=510, seed=0)
