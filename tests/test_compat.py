"""Drop-in classes (``RewardSampling``, ``QAlign``) give what ``fastalign.decode`` gives for the same seed."""

import copy

import pytest
import torch

import fastalign
from fastalign.compat import QAlign, RewardSampling
from fastalign.errors import InputError
from fastalign.testing import tiny_causal_lm, tiny_reward_model, tiny_tokenizer

V = 16
PROMPTS = ["w1 w2", "w3 w4 w5"]


@pytest.fixture(scope="module")
def models():
    return dict(target=tiny_causal_lm(vocab_size=V, init_range=0.2, seed=0),
                draft_r=tiny_causal_lm(vocab_size=V, init_range=0.2, seed=1, hidden=16),
                draft=tiny_causal_lm(vocab_size=V, init_range=0.2, seed=2, hidden=16),
                rm=tiny_reward_model(vocab_size=V), tok=tiny_tokenizer(V))


@pytest.fixture(scope="module")
def sampler(models):
    return RewardSampling(llm_dir=models["target"], rm_dir=models["rm"], draft_dir=models["draft"],
                          draft_r_dir=models["draft_r"], tokenizer=models["tok"], seed=7)


def full_texts(tok, prompts, sequences):
    ids = [tok(p)["input_ids"] for p in prompts]
    return tok.batch_decode([p + s for p, s in zip(ids, sequences)], skip_special_tokens=True)


def test_rm_score_is_the_reward_model_on_the_full_text(models, sampler):
    texts = ["w1 w2 w3", "w4"]
    scores = sampler.rm_score(texts)
    ids = [models["tok"](t)["input_ids"] for t in texts]
    expected = fastalign.RewardModel(models["rm"]).score(ids, [[], []])
    assert scores.shape == (2,) and torch.allclose(scores, expected)
    assert torch.allclose(sampler.rm_score("w4"), expected[1:])


def test_seg_rs_generate_is_cards(models, sampler):
    pytest.importorskip("fastalign.methods.cards")
    texts, (reward, llm_calls, rm_calls) = sampler.seg_rs_generate(
        PROMPTS, reward_threshold=0.5, entropy_threshold=2.0, beta=0.7, topk=8, max_new_token=6, seed=11)
    out = fastalign.decode(PROMPTS, method="cards", target=models["target"], reward=models["rm"],
                           tokenizer=models["tok"], max_new_tokens=6, temperature=0.7, top_k=8, seed=11,
                           mode="soft", entropy_threshold=2.0, reward_threshold=0.5, alpha=0.5, accept_beta=0.7)
    assert sampler.last_output.sequences == out.sequences
    assert texts == full_texts(models["tok"], PROMPTS, out.sequences)
    assert (llm_calls, rm_calls) == (out.stats["target_calls"], out.stats["reward_calls"])
    assert reward == pytest.approx(float(sampler.rm_score(texts).mean()))


def test_sss_generate_is_sss(models, sampler):
    pytest.importorskip("fastalign.methods.speculative")
    texts, (llm_calls, _) = sampler.sss_generate(PROMPTS, beta=0.8, topk=8, max_draft_token=3, max_new_token=6,
                                                 seed=5)
    out = fastalign.decode(PROMPTS, method="sss", target=models["target"], draft=models["draft_r"],
                           ref=models["draft"], tokenizer=models["tok"], max_new_tokens=6, temperature=0.8,
                           top_k=8, seed=5, num_draft_tokens=3)
    assert sampler.last_output.sequences == out.sequences and llm_calls == out.stats["target_calls"]
    assert texts == full_texts(models["tok"], PROMPTS, out.sequences)
    with pytest.raises(InputError, match="bonus_token=False"):
        sampler.sss_generate(PROMPTS, bonus_token=False)


def test_calls_without_a_seed_use_seed_plus_call_number(models):
    sampler = RewardSampling(llm_dir=models["target"], rm_dir=models["rm"], tokenizer=models["tok"], seed=3)
    engine = fastalign.Engine(target=models["target"], reward=models["rm"], tokenizer=models["tok"])
    assert sampler.next_seed(None) == 3 and sampler.next_seed(99) == 99 and sampler.next_seed(None) == 5
    pytest.importorskip("fastalign.methods.cards")
    sampler.seg_rs_generate(PROMPTS, reward_threshold=0.5, max_new_token=4)  # call 3: seed 6
    out = engine.decode(PROMPTS, method="cards", max_new_tokens=4, temperature=0.7, top_k=40, seed=6,
                        reward_threshold=0.5)
    assert sampler.last_output.sequences == out.sequences


def test_reward_sampling_loads_by_path_and_checks_arguments(models, tmp_path):
    models["target"].save_pretrained(tmp_path / "lm")
    models["tok"].save_pretrained(tmp_path / "lm")
    sampler = RewardSampling(llm_dir=str(tmp_path / "lm"), fp_bit=32)
    assert sampler.LLM.dtype == torch.float32 and sampler.tokenizer.get_vocab() == models["tok"].get_vocab()
    with pytest.raises(InputError, match="rm_dir"):
        sampler.rm_score(["w1"])
    with pytest.raises(InputError, match="fp_bit=8"):
        RewardSampling(llm_dir=str(tmp_path / "lm"), fp_bit=8)
    # missing models are named by role (a raw OSError from the Hub before), bad seeds at construction
    for where, role in [(dict(llm_dir=str(tmp_path / "none")), "target"),
                        (dict(llm_dir=str(tmp_path / "lm"), rm_dir=str(tmp_path / "none")), "reward"),
                        (dict(llm_dir=str(tmp_path / "lm"), draft_dir=str(tmp_path / "none")), "draft")]:
        with pytest.raises(InputError, match=f"cannot load the {role}"):
            RewardSampling(**where, fp_bit=32)
    for seed in ("a", [1, 2], -1, True, 2**64):
        with pytest.raises(InputError, match="seed must be"):
            RewardSampling(llm_dir=models["target"], tokenizer=models["tok"], seed=seed)
    last = RewardSampling(llm_dir=models["target"], rm_dir=models["rm"], tokenizer=models["tok"], seed=2**64 - 1)
    last.seg_rs_generate("w1", max_new_token=2)
    last.seg_rs_generate("w1", max_new_token=2)  # the next seed wraps to 0 (it was 2**64, refused)
    for extra in ({"temperature": 0.5}, {"mode": "hard"}, {"top_k": 3}, {"method": "bon"}):  # raw TypeErrors
        with pytest.raises(InputError, match=f"{next(iter(extra))}: set by this function's own arguments"):
            last.seg_rs_generate("w1", max_new_token=2, **extra)
    with pytest.raises(InputError, match="tokenizer"):
        RewardSampling(llm_dir=models["target"])
    with pytest.raises(InputError, match="no trained reward head"):  # a causal LM as rm_dir: random rewards
        RewardSampling(llm_dir=str(tmp_path / "lm"), rm_dir=str(tmp_path / "lm"), fp_bit=32)
    models["rm"].save_pretrained(tmp_path / "rm")
    models["tok"].save_pretrained(tmp_path / "rm")
    by_path = RewardSampling(llm_dir=str(tmp_path / "lm"), rm_dir=str(tmp_path / "rm"), fp_bit=32)
    assert by_path.rm_score(["w1"]).shape == (1,)


def test_qalign_run_returns_the_state_path_of_decode(models):
    pytest.importorskip("fastalign.methods.qalign")
    chain = QAlign(models["target"], models["rm"], beta=0.5, tokenizer=models["tok"], max_new_tokens=4)
    result = chain.run(PROMPTS, steps=3, seed=2)
    out = fastalign.decode(PROMPTS, method="qalign", target=models["target"], reward=models["rm"],
                           tokenizer=models["tok"], max_new_tokens=4, temperature=1.0, seed=2, beta=0.5, steps=3)
    assert result.sequences == out.sequences and result.texts == out.texts
    assert len(result.state_path) == 2 and len(result.state_path[0][0]) == 4  # initial state + 3 steps
    assert [[s["proposal"] for s in chain_path] for p in result.state_path for chain_path in p] == \
        [[s["proposal"] for s in chain_path] for p in out.extra["state_path"] for chain_path in p]
    single = chain.run("w1 w2", steps=1)
    assert len(single.state_path) == 1
    with pytest.raises(InputError, match="chat template"):
        chain.run([[{"role": "user", "content": "w1"}]], steps=1)


def test_qalign_renders_conversations_as_decode_does(models):
    """QAlign rendered a conversation to text and tokenised it again, so a template that writes its own BOS got a
    second one from the tokenizer (Llama 3, Gemma, Mistral templates): other prompts, other tokens than decode."""
    pytest.importorskip("fastalign.methods.qalign")
    from tokenizers import processors

    tok = copy.deepcopy(models["tok"])
    tok.bos_token = tok.convert_ids_to_tokens(1)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A",
                                                                   special_tokens=[(tok.bos_token, 1)])
    tok.chat_template = "{{ bos_token }} {% for m in messages %}{{ m['content'] }} {% endfor %}"
    conversation = [{"role": "user", "content": "w2 w3"}]
    chain = QAlign(models["target"], models["rm"], beta=0.5, tokenizer=tok, max_new_tokens=4)
    result = chain.run([conversation], steps=2, seed=3)
    engine = fastalign.Engine(target=models["target"], reward=models["rm"], tokenizer=tok)
    assert engine.encode([conversation])[0].count(1) == 1  # one BOS
    out = engine.decode([conversation], method="qalign", max_new_tokens=4, temperature=1.0, seed=3, beta=0.5,
                        steps=2)
    assert result.sequences == out.sequences
    assert result.stats["target_tokens"] == out.stats["target_tokens"]  # the same prompt (a BOS more counted)
    with pytest.raises(InputError, match="content"):  # a malformed message is named, as decode names it
        chain.run([[{"role": "user"}]], steps=1)
    # chat=True renders prompt strings with the template, as before; what run sets itself is refused by name
    rendered = chain.run(["w2 w3"], steps=2, seed=3, chat=True)
    assert rendered.stats["target_tokens"] == result.stats["target_tokens"]
    for extra in ({"temperature": 0.5}, {"beta": 2.0}, {"method": "bon"}, {"max_new_tokens": 3}):
        with pytest.raises(InputError, match=f"{next(iter(extra))}: set by this function's own arguments"):
            chain.run(["w2 w3"], steps=1, **extra)
