"""Gold rewards: the rewards that judge an evaluation's outputs (not the ones the methods optimise)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError
from ..methods.answers import EXTRACTORS
from ..models.builder import ModelBuilder
from ..models.reward import RewardModel, same_vocabulary
from ..models.text_rewards import call_text_reward, text_reward_function
from ..validation import check_scores, loading
from .worlds import load_world


@dataclass
class GoldReward:
    """The reward that judges the outputs (not the one a method optimises).

    ``fn(prompt_ids, response_ids, prompt_texts, completion_texts, records) -> sequence of N floats``; build
    one with ``GoldReward.from_spec`` or from a reward accepted by ``fastalign.decode`` (``from_reward``).
    """

    fn: object
    name: str

    def __call__(self, prompt_ids, response_ids, prompt_texts, completion_texts, records) -> list[float]:
        scores = self.fn(prompt_ids, response_ids, prompt_texts, completion_texts, records)
        scores = check_scores(f"gold reward {self.name!r}", scores, len(response_ids))
        bad = next((i for i, x in enumerate(scores) if not math.isfinite(x)), None)
        if bad is not None:  # a NaN would silently poison the means and win rates
            raise InputError(f"gold reward {self.name!r} is {scores[bad]} for the prompt {prompt_texts[bad]!r}; "
                             "gold rewards must be finite numbers")
        return scores

    @classmethod
    def from_reward(cls, reward, name: str = "reward", tokenizer=None, policy_tokenizer=None) -> GoldReward:
        """From an HF sequence-classification model or a token-id callable ``reward(prompts, responses)``."""
        rm = reward if isinstance(reward, RewardModel) else RewardModel(reward, tokenizer, policy_tokenizer)
        return cls(lambda p, r, pt, ct, rec: rm.score(p, r), name)

    @classmethod
    def from_world(cls, world, name: str, policy_tokenizer=None) -> GoldReward:
        """A world's gold reward, which reads the world's token ids: refused for a policy whose tokenizer is not
        the world's (its ids would be read as other words, and every output judged wrong without a word)."""
        if policy_tokenizer is not None and not same_vocabulary(policy_tokenizer, world.tokenizer):
            raise InputError(f"the {name!r} gold reward reads the {name} world's tokens, and the target's "
                             f"tokenizer is another ({len(policy_tokenizer)} tokens, the world's "
                             f"{len(world.tokenizer)}); judge another model's outputs with a text reward")
        return cls.from_reward(world.gold_reward, name)

    @classmethod
    def from_text_fn(cls, fn, name: str) -> GoldReward:
        """From ``fn(prompts: list[str], completions: list[str]) -> N floats``: the caller's code, so an
        exception it raises is an ``InputError`` naming the gold reward (``text_rewards.call_text_reward``)."""
        return cls(lambda p, r, pt, ct, rec: call_text_reward(fn, f"gold reward {name!r}", pt, ct), name)

    @classmethod
    def from_spec(cls, spec: str, policy_tokenizer=None, world=None, trust_remote_code: bool = False,
                  device=None, dtype=None) -> GoldReward:
        """``"toy"``: the toy world's gold reward; ``"arith"``: the arith world's answer checker;
        ``"last_number"``, ``"boxed"``, ``"option"``, ``"answer"``: 1 if the answer
        extracted from the completion (``fastalign.methods.answers``) equals the one extracted from the record's
        ``answer`` field (GSM8K: ``"... #### 72"``), else 0; ``"vader"``: the VADER sentiment of the completion
        (``fastalign.models.text_rewards``); ``"module:function"``: a Python function called on texts ``(prompts, completions)``;
        anything else: an HF reward model name or path."""
        if spec == "toy":
            world = world if hasattr(world, "aligned_draft") else load_world("toy").source  # not another world's
            return cls.from_world(world, "toy", policy_tokenizer)
        if spec == "arith":  # the answer checker: 1 if the final answer is the problem's true value
            world = world if hasattr(world, "step_reward") else load_world("arith").source
            return cls.from_world(world, "arith", policy_tokenizer)
        if spec in EXTRACTORS:
            extract = EXTRACTORS[spec]

            def match(p, r, pt, ct, records):
                if any("answer" not in rec for rec in records):
                    raise InputError(f"the {spec!r} gold reward needs an 'answer' field in every prompt record")
                return [float(extract(c) is not None and extract(c) == extract(str(rec["answer"])))
                        for c, rec in zip(ct, records)]
            return cls(match, spec)
        fn = text_reward_function(spec, role="gold reward")
        if fn is not None:
            return cls.from_text_fn(fn, spec)
        build = ModelBuilder(device, dtype, trust_remote_code=trust_remote_code)
        with loading("gold reward", spec):
            return cls.from_reward(build.reward(spec, None, policy_tokenizer), spec)
