"""The arithmetic reasoning world: multi-step arithmetic problems with worked solutions, shipped with the package.

A problem is an expression of three or four one-digit operands and the operators ``+ - *``; the prompt asks for
it and the response works it out one step per segment, each step ending with the step separator ``;``, then
gives the final answer and ends with ``</s>``::

    prompt:    q : 3 + 4 * 2 =
    response:  4 * 2 = 8 ; 3 + 8 = 11 ; answer 11 </s>

The steps follow a canonical order: the leftmost ``*`` first, else the leftmost ``+`` or ``-``; every
intermediate result and the answer lie in ``0..99`` (the generator rejects problems leaving that range), so the
numbers ``0`` to ``99`` are single tokens.

The **target** is trained on solutions with injected step errors: each step's result is replaced, with
probability ``ERROR_RATE``, by a nearby wrong number, and the later steps carry the wrong number on (they are
right *given* the written steps). So plain sampling is right only part of the time (``manifest.json``:
``metrics.sample_accuracy``), and search has room to help.

Rewards (all over token ids, ``fastalign`` reward callables ``(prompts, responses) -> [N]`` fp32):

* ``ArithWorld.gold_reward``, the **answer checker**: 1 if the response's final answer (``answer_of``: the number
  after the last ``answer``) equals the true value of the problem, else 0.
* ``ArithWorld.step_reward``, the rule-based **process reward** of a (partial) response: minus the number of
  wrong steps so far (0 while every step is right; ``step_checks`` gives the steps one by one). A step is
  *checked* once it is complete (followed by ``;``); the final ``answer N`` segment once the response has
  ended. A step ``a op b = c`` is right when ``a op b`` is the canonical next operation of the expression as
  the earlier steps wrote it and ``c`` is its value; ``answer N`` is right when the written steps have reduced
  the expression to ``N``. A malformed step is wrong. So a finished response is right on every step exactly
  when its derivation is sound (and then its answer is right).
* ``ArithWorld.reward``, the **outcome reward model**: a ``LlamaForSequenceClassification`` (one logit) trained
  to predict whether a finished response's final answer is right, and, on any prefix, whether every step
  decided so far is right (so its partial scores mean something to ``speculative_rejection``). It is an
  imperfect verifier (``manifest.json``: ``reward_accuracy_on_samples``, ``bon8_accuracy``).

The tokenizer is word level (``build_tokenizer``): ``<pad>`` 0, ``<s>`` 1 (prepended to every text), ``</s>`` 2
(EOS), ``<unk>`` 3, then ``0`` .. ``99``, ``+ - * = ; q : answer``. ``scripts/build_arith_world.py`` trains the
models into ``fastalign/data/arithworld/`` with a ``manifest.json`` of checksums; ``load_arith_world()`` loads
them from those local files only.

    world = load_arith_world()
    out = fastalign.decode(world.prompts, method="bon", target=world.target, reward=world.reward,
                           tokenizer=world.tokenizer, n=8, select="majority", answer_fn="answer",
                           max_new_tokens=32)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .toyworld import load_shipped_models, word_level_tokenizer

OPERATORS = ("+", "-", "*")
MAX_VALUE = 99  # every intermediate result and answer lies in 0..MAX_VALUE
OPERAND_COUNTS, OPERAND_COUNT_WEIGHTS = (3, 4), (0.5, 0.5)
SEP = ";"  # ends every step
ANSWER = "answer"
ERROR_RATE = 0.2  # per step, in the target's training solutions
ERROR_OFFSETS = (-10, -2, -1, 1, 2, 10)  # a wrong result: the right one plus one of these (kept in range)
NUM_PROMPTS, PROMPT_SEED = 32, 1000  # the world's prompts: held-out problems (never in the training corpus)


# ------------------------------------------------------------------ problems and solutions
def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def next_operation(state: list) -> int:
    """Index of the operator the canonical order reduces next in ``state`` ``[n0, op1, n1, ...]``."""
    ops = state[1::2]
    i = ops.index("*") if "*" in ops else 0
    return 2 * i + 1


def solve(state: list) -> list[tuple[int, str, int, int]]:
    """The canonical steps ``(a, op, b, value)`` of an expression ``[n0, op1, n1, ...]``."""
    state, steps = list(state), []
    while len(state) > 1:
        i = next_operation(state)
        a, op, b = state[i - 1: i + 2]
        value = apply(a, op, b)
        steps.append((a, op, b, value))
        state[i - 1: i + 2] = [value]
    return steps


def generate_problem(rng: random.Random) -> list:
    """An expression ``[n0, op1, n1, ...]`` whose steps all stay in ``0..MAX_VALUE`` (rejection sampling)."""
    while True:
        count = rng.choices(OPERAND_COUNTS, OPERAND_COUNT_WEIGHTS)[0]
        state = [rng.randrange(10)]
        for _ in range(count - 1):
            state += [rng.choice(OPERATORS), rng.randrange(10)]
        if all(0 <= step[3] <= MAX_VALUE for step in solve(state)):
            return state


def question(state: list) -> str:
    """The prompt of a problem: ``q : 3 + 4 * 2 =``."""
    return "q : " + " ".join(map(str, state)) + " ="


def parse_question(text: str) -> list | None:
    """The expression of a prompt text (``None`` if it is not a question of this language)."""
    words = text.split()
    if len(words) < 5 or words[:2] != ["q", ":"] or words[-1] != "=" or len(words) % 2 == 1:
        return None
    body = words[2:-1]
    try:
        state = [int(w) if k % 2 == 0 else w for k, w in enumerate(body)]
    except ValueError:
        return None
    return state if all(op in OPERATORS for op in state[1::2]) else None


def wrong_value(value: int, rng: random.Random) -> int:
    """A nearby wrong result in ``0..MAX_VALUE``."""
    while True:
        wrong = value + rng.choice(ERROR_OFFSETS)
        if 0 <= wrong <= MAX_VALUE:
            return wrong


def solution(state: list, rng: random.Random | None = None, error_rate: float = 0.0) -> tuple[str, list[bool]]:
    """A worked solution (the response text, without ``</s>``) and, per step, whether an error was injected.

    With ``error_rate > 0`` each step's result is replaced by ``wrong_value`` with that probability; the
    later steps go on from the written (wrong) result, as a solver who trusts its own steps would.
    """
    state, lines, injected = list(state), [], []
    while len(state) > 1:
        i = next_operation(state)
        a, op, b = state[i - 1: i + 2]
        value = apply(a, op, b)
        wrong = error_rate > 0 and rng.random() < error_rate
        if wrong:
            candidate = wrong_value(value, rng)
            # a wrong result must leave the remaining steps in range; else keep the right one
            trial = state[: i - 1] + [candidate] + state[i + 2:]
            wrong = all(0 <= s[3] <= MAX_VALUE for s in solve(trial))
            value = candidate if wrong else value
        injected.append(wrong)
        lines.append(f"{a} {op} {b} = {value} {SEP}")
        state[i - 1: i + 2] = [value]
    lines.append(f"{ANSWER} {state[0]}")
    return " ".join(lines), injected


def true_answer(state: list) -> int:
    return solve(state)[-1][3] if len(state) > 1 else state[0]


def check_steps(expression: list, response: str, finished: bool) -> list[bool]:
    """Per checked step of ``response`` (text), whether it is right (see the module docstring).

    Complete steps (followed by ``;``) are checked; the final segment too when ``finished`` (the response has
    ended), else it is still being written and is not checked.
    """
    parts = response.split(SEP)
    segments = parts if finished else parts[:-1]
    state, checks = list(expression), []
    for k, segment in enumerate(segments):
        words = segment.split()
        if not (finished and k == len(parts) - 1):  # a step
            ok, a = False, None
            if len(words) == 5 and words[1] in OPERATORS and words[3] == "=" and len(state) > 1:
                try:
                    a, b, c = int(words[0]), int(words[2]), int(words[4])
                except ValueError:
                    pass
                i = next_operation(state)
                if a is not None and [a, words[1], b] == state[i - 1: i + 2]:
                    ok = c == apply(a, words[1], b)
                    state[i - 1: i + 2] = [c]  # later steps go on from the written result
            checks.append(ok)
        else:  # the final answer
            checks.append(words == [ANSWER, str(state[0])] and len(state) == 1)
    return checks


_ANSWER = re.compile(r"\banswer\s+(-?\d+)")


def answer_of(text: str) -> str | None:
    """The final answer of a response text: the number right after the last ``answer``; None if there is none."""
    found = _ANSWER.findall(text)
    return found[-1] if found else None


# ------------------------------------------------------------------ tokenizer (the toy world's kind)


def vocabulary() -> list[str]:
    """Every word of the language (special tokens excluded), in id order."""
    return [str(n) for n in range(MAX_VALUE + 1)] + [*OPERATORS, "=", SEP, "q", ":", ANSWER]


def build_tokenizer():
    """The word-level tokenizer of the language (``PreTrainedTokenizerFast``); it prepends ``<s>`` to every text."""
    return word_level_tokenizer(vocabulary())


def held_out_problems(num: int = NUM_PROMPTS, seed: int = PROMPT_SEED) -> list[list]:
    """``num`` distinct problems, deterministic in ``seed`` (the world's prompts are the first ``NUM_PROMPTS``
    of seed ``PROMPT_SEED``; the build script keeps all held-out problems out of the training corpus)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < num:
        state = generate_problem(rng)
        if question(state) not in seen:
            seen.add(question(state))
            out.append(state)
    return out


PROMPTS = [question(s) for s in held_out_problems()]


# ------------------------------------------------------------------ loading the shipped world
DATA_DIR = Path(__file__).parent.parent / "data" / "arithworld"
MODEL_NAMES = ("target", "reward")


@dataclass
class ArithWorld:
    """The shipped arithmetic world: HF models (eval mode), their tokenizer, the rewards and the prompts."""

    target: object  # LlamaForCausalLM trained on solutions with injected step errors
    reward: object  # LlamaForSequenceClassification, one logit: is the (partial) solution right
    tokenizer: object  # PreTrainedTokenizerFast (word level; prepends <s>)
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))

    answer_of = staticmethod(answer_of)

    def _texts(self, prompts, responses) -> tuple[list[str], list[str], list[bool]]:
        eos = self.tokenizer.eos_token_id
        decode = self.tokenizer.batch_decode
        return (decode([list(p) for p in prompts], skip_special_tokens=True),
                decode([list(r) for r in responses], skip_special_tokens=True),
                [eos in list(r) for r in responses])

    def step_checks(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[bool]]:
        """Per response, whether each checked step is right (``check_steps``); a response ends at ``</s>``."""
        questions, texts, finished = self._texts(prompts, responses)
        out = []
        for q, text, done in zip(questions, texts, finished):
            expression = parse_question(q)
            out.append([False] if expression is None else check_steps(expression, text, done))
        return out

    def step_reward(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """The process reward of (partial) responses, ``[N]`` fp32: minus the number of wrong checked steps."""
        return torch.tensor([-float(sum(not ok for ok in checks)) for checks in self.step_checks(prompts, responses)],
                            dtype=torch.float32)

    def gold_reward(self, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """The answer checker, ``[N]`` fp32: 1 if the final answer equals the problem's true value, else 0."""
        questions, texts, _ = self._texts(prompts, responses)
        out = []
        for q, text in zip(questions, texts):
            expression = parse_question(q)
            out.append(float(expression is not None and answer_of(text) == str(true_answer(expression))))
        return torch.tensor(out, dtype=torch.float32)


def load_arith_world(device=None, path: str | Path | None = None) -> ArithWorld:
    """Load the shipped arithmetic world from local files only (works with ``HF_HUB_OFFLINE=1``)."""
    models, tokenizer = load_shipped_models(Path(path) if path is not None else DATA_DIR, MODEL_NAMES, "arith",
                                            "scripts/build_arith_world.py", device)
    return ArithWorld(models["target"], models["reward"], tokenizer)
