"""Drop-in classes for users of the original research code, running on fastalign's engine.

``RewardSampling`` follows the class of the CARDS / SSS repository (``reward_sampling.RewardSampling``):

    sampler = RewardSampling(llm_dir="...", rm_dir="...")                  # CARDS
    texts, (reward, llm_calls, rm_calls) = sampler.seg_rs_generate(["###Human: Hi ###Assistant:"], max_new_token=128)
    sampler = RewardSampling(llm_dir="...", draft_dir="SFT draft", draft_r_dir="DPO draft")   # SSS
    texts, (llm_calls, rm_calls) = sampler.sss_generate(["###Human: Hi ###Assistant:"])
    rewards = sampler.rm_score(["###Human: Hi ###Assistant: Hello!"])       # [B]

``QAlign`` follows the QAlign / QUEST usage (a chain over whole responses, its ``state_path`` as output):

    result = QAlign(model, reward, beta=1.0).run(["What is 2+3?"], steps=64)
    result.state_path[0]    # prompt 0's trajectory (see fastalign.methods.qalign)

Differences from the originals (all deliberate):

- Batches are decoded together, with KV caches, and the draws come from fastalign's seeded RNG: call ``k`` of
  an instance uses the seed ``seed + k`` unless a ``seed=`` is passed, so results are reproducible, but not the
  tokens the original code would draw.
- The call counts returned are *batched forward passes* (``out.stats["target_calls"]``, ``["reward_calls"]``);
  the original counted one call per row per pass. ``sampler.last_output.stats`` has everything (tokens per
  model, wall time, method counters).
- ``seg_rs_generate``'s ``reward`` is the mean reward-model score of the returned responses (one extra
  reward call, not in the counts); the original returned the last scored candidate's reward.
- ``seg_rs_generate``: ``beta`` is, as in the original, both the sampling temperature and the soft-acceptance
  temperature (``accept_beta``); segments are cut, scored and accepted as in docs/design.md section 1.1.
- ``sss_generate`` runs the exact reward-shifted sampler (``variant="exact"``) unless ``variant="paper"`` is
  passed; the original's known bugs (docs/design.md section 1.2) are not reproduced. ``bonus_token=False`` is refused:
  the token emitted at a rejection is part of every correct variant (``variant="paper",
  bonus_on_full_accept=False`` reproduces the published behaviour at full acceptance).
- Texts are returned like the original (``prompt + response`` decoded with ``skip_special_tokens=True``);
  ``last_output.texts`` holds the responses alone.
- ``cache_dir`` and ``access_token`` are passed to ``from_pretrained``; ``fp_bit`` 16 / 32 load bfloat16 /
  float32 weights; 4- and 8-bit loading is not done here (load the quantized model yourself and pass it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .api import DecodeOutput, Engine
from .errors import InputError
from .models.loading import load_reward_model
from .validation import check_int, loading

_DTYPES = {16: torch.bfloat16, 32: torch.float32}


def _load(spec, role: str, load_kwargs: dict):
    """A causal LM from a name/path (or the object itself); a load failure names ``role`` and ``spec``."""
    if spec is None or not isinstance(spec, str):
        return spec
    from transformers import AutoModelForCausalLM

    with loading(role, spec):
        return AutoModelForCausalLM.from_pretrained(spec, **load_kwargs)


def _load_reward(spec, load_kwargs: dict):
    if spec is None or not isinstance(spec, str):
        return spec
    with loading("reward", spec):
        return load_reward_model(spec, **load_kwargs)


def _load_tokenizer(spec, role: str, load_kwargs: dict):
    if spec is None or not isinstance(spec, str):
        return spec
    from transformers import AutoTokenizer

    with loading(role, spec):
        return AutoTokenizer.from_pretrained(spec, **load_kwargs)


def _extras(options: dict, own) -> dict:
    """The caller's extra ``options``, which may not set what the compat function sets itself (``own``, and the
    method and seed): a raw "multiple values" TypeError before."""
    clash = sorted(set(options) & (set(own) | {"method", "seed"}))
    if clash:
        raise InputError(f"{', '.join(clash)}: set by this function's own arguments (e.g. beta is the "
                         "temperature, topk the top-k, option the mode); pass them there")
    return options


class _SeededCalls:
    """Per-call seeds ``seed, seed + 1, ...`` unless a call passes its own."""

    def __init__(self, seed: int | None):
        self.seed, self.calls = check_int("seed", seed, 0, 2**64 - 1, optional=True), 0

    def next_seed(self, seed: int | None) -> int | None:
        self.calls += 1
        if seed is not None or self.seed is None:
            return seed
        return (self.seed + self.calls - 1) % 2**64  # (the seeds decode takes)


class RewardSampling(_SeededCalls):
    """The CARDS / SSS repository's ``RewardSampling`` on fastalign's engine.

    ``llm_dir`` (target), ``rm_dir`` (reward model), ``draft_dir`` (the reference draft: SFT, before alignment)
    and ``draft_r_dir`` (the aligned draft, e.g. DPO) are HF names/paths, as in the original, or already-loaded
    model objects. ``tokenizer`` defaults to the target's; ``rm_tokenizer`` is the reward model's when its
    vocabulary differs. Attributes ``LLM``, ``RM``, ``tokenizer`` and ``engine`` (a ``fastalign.Engine``).
    """

    def __init__(self, llm_dir, rm_dir=None, draft_dir=None, draft_r_dir=None, cache_dir: str | None = None,
                 access_token: str | None = None, seed: int | None = 1, fp_bit: int = 16, device_map=None, *,
                 tokenizer=None, rm_tokenizer=None, device=None, trust_remote_code: bool = False):
        super().__init__(seed)
        if fp_bit not in _DTYPES:
            raise InputError(f"fp_bit={fp_bit} is not supported here: use 16 or 32, or pass a quantized model object")
        if tokenizer is None and not isinstance(llm_dir, str):
            raise InputError("RewardSampling needs tokenizer=... when llm_dir is a model object")
        load = dict(cache_dir=cache_dir, token=access_token, trust_remote_code=trust_remote_code)
        model_load = dict(load, dtype=_DTYPES[fp_bit], **({"device_map": device_map} if device_map else {}))
        self.tokenizer = _load_tokenizer(tokenizer if tokenizer is not None else llm_dir,
                                         "tokenizer" if tokenizer is not None else "target", load)
        self.LLM = _load(llm_dir, "target", model_load)
        self.RM = _load_reward(rm_dir, model_load)
        self.draft = _load(draft_dir, "draft", model_load)
        self.draft_r = _load(draft_r_dir, "aligned draft", model_load)
        if rm_tokenizer is None and isinstance(rm_dir, str):
            rm_tokenizer = rm_dir
        self.engine = Engine(target=self.LLM, draft=self.draft_r, ref=self.draft, reward=self.RM,
                             tokenizer=self.tokenizer,
                             reward_tokenizer=_load_tokenizer(rm_tokenizer, "reward tokenizer", load),
                             device=device)
        self.last_output: DecodeOutput | None = None

    def _decode(self, prompt, method: str, seed, options: dict, **kwargs) -> tuple[list[list[int]], DecodeOutput]:
        """``kwargs``: what the caller's function sets from its own arguments; ``options``: the caller's extras."""
        kwargs.update(_extras(options, kwargs))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.engine.encode(prompts)
        self.last_output = self.engine.decode(ids, method=method, seed=self.next_seed(seed), **kwargs)
        return ids, self.last_output

    def _full_texts(self, ids, out: DecodeOutput) -> list[str]:
        return self.tokenizer.batch_decode([p + s for p, s in zip(ids, out.sequences)], skip_special_tokens=True)

    def seg_rs_generate(self, prompt, option: str = "soft", entropy_threshold: float = 3.0,
                        reward_threshold: float = 8.5, alpha: float = 0.5, beta: float = 0.7, topk: int = 40,
                        max_new_token: int = 128, debug: bool = False, *, seed: int | None = None, **options):
        """CARDS. Returns ``(texts, (reward, num_llm_call, num_rm_call))`` like the original; extra keyword
        ``options`` go to ``fastalign`` (e.g. ``parallel_candidates``, ``max_rejections``)."""
        ids, out = self._decode(prompt, "cards", seed, options, max_new_tokens=max_new_token, temperature=beta,
                                top_k=topk, mode=option, entropy_threshold=entropy_threshold,
                                reward_threshold=reward_threshold, alpha=alpha, accept_beta=beta)
        texts = self._full_texts(ids, out)
        reward = float(self.rm_score(texts).mean())
        if debug:
            print(out.stats)
        return texts, (reward, out.stats["target_calls"], out.stats["reward_calls"])

    def sss_generate(self, prompt, beta: float = 0.8, topk: int = 40, max_draft_token: int = 4,
                     max_new_token: int = 128, bonus_token: bool = True, *, lam: float = 1.0,
                     variant: str = "exact", seed: int | None = None, **options):
        """SSS (needs ``draft_r_dir`` and ``draft_dir``). ``beta`` is the temperature, ``topk`` the drafts'
        top-k, ``max_draft_token`` the draft length K. Returns ``(texts, (num_llm_call, 0))``."""
        if not bonus_token:
            raise InputError("bonus_token=False is not supported: the token emitted at a rejection is needed for a "
                             "correct sampler; use variant='paper', bonus_on_full_accept=False for the published rule")
        ids, out = self._decode(prompt, "sss", seed, options, max_new_tokens=max_new_token, temperature=beta,
                                top_k=topk, num_draft_tokens=max_draft_token, lam=lam, variant=variant)
        return self._full_texts(ids, out), (out.stats["target_calls"], 0)

    @torch.no_grad()
    def rm_score(self, text) -> torch.Tensor:
        """Reward-model score of each full text (prompt and response together).  ``[B]`` fp32."""
        if self.engine.reward is None:
            raise InputError("rm_score needs a reward model (rm_dir=...)")
        texts = [text] if isinstance(text, str) else list(text)
        ids = self.engine.encode(texts)
        return self.engine.reward.score(ids, [[] for _ in ids])


@dataclass
class QAlignOutput:
    state_path: list  # per prompt: the chain's trajectory (out.extra["state_path"] of the qalign method)
    texts: list[str] | None  # final answer per prompt (responses only)
    sequences: list[list[int]]
    stats: dict
    output: DecodeOutput


class QAlign(_SeededCalls):
    """QAlign (MCMC over whole responses, target ``p(y|x) exp(r(x, y) / beta)``) on fastalign's engine.

    ``model`` is a causal LM (HF name/path or object), ``reward`` an HF reward model (name/path or object) or a
    callable ``reward(prompts, responses)`` over token ids. ``run(conversations, steps)`` takes prompt strings or
    chat conversations (lists of ``{"role", "content"}`` messages, rendered with the tokenizer's chat template).
    """

    def __init__(self, model, reward, beta: float = 1.0, tokenizer=None, reward_tokenizer=None,
                 temperature: float = 1.0, max_new_tokens: int = 256, seed: int | None = None, device=None,
                 dtype=None, trust_remote_code: bool = False):
        super().__init__(seed)
        if tokenizer is None and not isinstance(model, str):
            raise InputError("QAlign needs tokenizer=... when the model is given as an object")
        self.beta, self.temperature, self.max_new_tokens = beta, temperature, max_new_tokens
        self.engine = Engine(target=model, reward=reward, tokenizer=tokenizer, reward_tokenizer=reward_tokenizer,
                             device=device, dtype=dtype, trust_remote_code=trust_remote_code)

    def run(self, conversations, steps: int = 8, chains: int = 1, select: str = "last", answer_fn=None,
            seed: int | None = None, **options) -> QAlignOutput:
        """Run ``steps`` MCMC steps per chain; returns the trajectories (``state_path``) and final answers."""
        if isinstance(conversations, str) or (conversations and isinstance(conversations[0], dict)):
            conversations = [conversations]  # a single prompt or a single conversation
        # conversations render through the engine (the template's own BOS, no second one; messages checked);
        # chat=True renders prompt strings too
        own = dict(max_new_tokens=self.max_new_tokens, temperature=self.temperature, beta=self.beta, steps=steps,
                   chains=chains, select=select, answer_fn=answer_fn, chat=options.pop("chat", False))
        extras = _extras(options, own)  # (refused before a seed is used up)
        out = self.engine.decode(list(conversations), method="qalign", seed=self.next_seed(seed), **own, **extras)
        return QAlignOutput(out.extra["state_path"], out.texts, out.sequences, out.stats, out)
