"""The built-in toy world: shipped files, tokenizer, gold reward, that alignment is real on it, and the demo."""

import hashlib
import io
import json
import os

import pytest
import torch

import fastalign
from fastalign.eval import toyworld
from fastalign.eval.demo import COLUMNS, METHODS, SETTINGS, run_demo
from fastalign.eval.toyworld import DATA_DIR, gold_reward_text, load_toy_world

MANIFEST = json.loads((DATA_DIR / "manifest.json").read_text())
SEED = 0


@pytest.fixture(scope="module")
def world():
    return load_toy_world()


def mean_gold(prompts, texts) -> float:
    return sum(gold_reward_text(f"{p} {c}") for p, c in zip(prompts, texts)) / len(texts)


# ------------------------------------------------------------------ shipped files
def test_shipped_files_are_the_ones_the_build_script_wrote():
    shipped = sorted(str(p.relative_to(DATA_DIR)) for p in DATA_DIR.rglob("*") if p.is_file())
    assert shipped == sorted([*MANIFEST["files"], "manifest.json"])
    for name, digest in MANIFEST["files"].items():
        assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum((DATA_DIR / n).stat().st_size for n in MANIFEST["files"]) < 4e6  # a few MB at most


def test_corpus_and_tokenizer_rebuild_identically(world):
    settings = MANIFEST["settings"]
    corpus = toyworld.generate_corpus(settings["corpus_size"], settings["corpus_seed"])
    assert hashlib.sha256("\n".join(corpus).encode()).hexdigest() == MANIFEST["corpus_sha256"]
    assert toyworld.build_tokenizer().get_vocab() == world.tokenizer.get_vocab()
    assert settings["reward_scale"] == toyworld.REWARD_SCALE


def test_loads_offline_without_remote_code(world):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest: nothing may be downloaded
    V = len(world.tokenizer)
    for model in (world.target, world.draft, world.aligned_draft):
        assert model.config.model_type == "llama" and model.config.vocab_size == V
        assert model.generation_config.eos_token_id == world.tokenizer.eos_token_id
        assert not model.training
    assert world.ref is world.draft
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(world.draft) < count(world.target) / 2
    assert world.reward.config.num_labels == 1 and type(world.reward).__name__ == "LlamaForSequenceClassification"
    assert world.prompts == toyworld.PROMPTS


def test_missing_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="toy world files missing"):
        load_toy_world(path=tmp_path)


# ------------------------------------------------------------------ tokenizer and gold reward
def test_tokenizer_round_trips(world):
    tok = world.tokenizer
    for text in toyworld.generate_corpus(200, seed=123) + toyworld.PROMPTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.decode([*tok("review : the pasta was cold .")["input_ids"], tok.eos_token_id],
                      skip_special_tokens=True) == "review : the pasta was cold ."


def test_gold_reward():
    assert gold_reward_text("review : the pasta was delicious , loved it .") == 1.0
    assert gold_reward_text("review : the pasta was cold and the waiter was rude , never returning .") == -1.0
    assert gold_reward_text("review : the soup was okay but the chef was rude .") == -0.5
    assert gold_reward_text("review : the pasta") == 0.0
    assert all(-1 <= gold_reward_text(t) <= 1 for t in toyworld.generate_corpus(500, seed=1))


def test_gold_reward_is_a_fastalign_reward(world):
    prompts = [world.tokenizer(p)["input_ids"] for p in ("review : the pasta", "review : my phone")]
    responses = [world.tokenizer("was delicious .", add_special_tokens=False)["input_ids"] + [2],
                 world.tokenizer("is broken", add_special_tokens=False)["input_ids"]]
    assert world.gold_reward(prompts, responses).tolist() == [1.0, -1.0]


def test_reward_model_tracks_the_gold_reward(world):
    texts = toyworld.generate_corpus(64, seed=7)
    ids = [world.tokenizer(t)["input_ids"] for t in texts]
    scores = fastalign.RewardModel(world.reward).score(ids, [[] for _ in ids])
    gold = torch.tensor([gold_reward_text(t) for t in texts])
    assert torch.corrcoef(torch.stack([scores, gold]))[0, 1] > 0.95


# ------------------------------------------------------------------ alignment is real
def test_aligned_draft_is_more_positive_than_the_ref(world):
    prompts = world.prompts * 4
    gold = {}
    for name in ("aligned_draft", "ref"):
        out = fastalign.decode(prompts, method="sample", target=getattr(world, name), tokenizer=world.tokenizer,
                               max_new_tokens=24, seed=SEED)
        gold[name] = mean_gold(prompts, out.texts)
    assert gold["aligned_draft"] > gold["ref"] + 0.3, gold


def test_aligned_draft_log_ratio_carries_the_reward(world):
    """q_r ∝ q * exp(r / beta): over whole reviews, log q_r(y) - log q(y) = r(y) / beta - log Z."""
    rows = [world.tokenizer(t)["input_ids"] + [world.tokenizer.eos_token_id]
            for t in toyworld.generate_corpus(256, seed=11)]
    tokens, live = fastalign.models.causal_lm.right_pad(rows)

    def log_prob(model):  # [N]: log-probability of each review after <s>
        with torch.no_grad():
            logits = model(input_ids=tokens, attention_mask=live.long()).logits[:, :-1].float()
        per_token = torch.log_softmax(logits, -1).gather(2, tokens[:, 1:, None])[..., 0]
        return (per_token * live[:, 1:]).sum(1)

    log_ratio = log_prob(world.aligned_draft) - log_prob(world.ref)
    r = fastalign.RewardModel(world.reward).score(rows, [[] for _ in rows])
    slope = ((log_ratio - log_ratio.mean()) * (r - r.mean())).sum() / ((r - r.mean()) ** 2).sum()
    assert torch.corrcoef(torch.stack([log_ratio, r]))[0, 1] > 0.75
    assert 0.6 / MANIFEST["settings"]["align_beta"] < slope < 1.4 / MANIFEST["settings"]["align_beta"], slope


ALIGNED = [("bon", {"n": 4}), ("cards", SETTINGS["cards"][1]), ("args", SETTINGS["args"][1]),
           ("sss", SETTINGS["sss"][1]), ("qalign", SETTINGS["qalign"][1])]


@pytest.mark.parametrize("method,options", ALIGNED, ids=[m for m, _ in ALIGNED])
def test_alignment_raises_the_gold_reward_over_sample(world, method, options):
    prompts = world.prompts * 2
    engine = fastalign.Engine(target=world.target, draft=world.aligned_draft, ref=world.ref,
                              reward=world.reward, tokenizer=world.tokenizer)
    gold = {}
    for name, opts in (("sample", {}), (method, options)):
        out = engine.decode(prompts, method=name, max_new_tokens=24, temperature=1.0, seed=SEED, **opts)
        gold[name] = mean_gold(prompts, out.texts)
    assert gold[method] > gold["sample"] + 0.25, gold


# ------------------------------------------------------------------ demo
def test_demo_runs_every_method_on_a_reduced_setting():
    printed = io.StringIO()
    rows = run_demo(methods=list(METHODS), num_prompts=2, max_new_tokens=6, seed=SEED, show=1, file=printed)
    assert [r["method"] for r in rows] == list(METHODS)
    for row in rows:
        assert set(COLUMNS) <= set(row)
        assert -1 <= row["gold"] <= 1 and row["target_calls"] > 0 and row["generated_tokens"] > 0
        assert len(row["texts"]) == 2 and row["texts"][0].startswith(toyworld.PROMPTS[0])
    by_name = {r["method"]: r for r in rows}
    assert by_name["sample"]["gold_vs_sample"] == 0 and by_name["sample"]["time_vs_sample"] == 1
    assert by_name["sss"]["draft_calls"] > 0 and by_name["sss"]["ref_calls"] > 0
    assert by_name["sd"]["draft_calls"] > 0 and by_name["sd"]["ref_calls"] == 0
    assert by_name["bon"]["reward_calls"] > 0
    table = printed.getvalue()
    assert all(f"| {m} |" in table for m in METHODS)


def test_demo_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown demo method"):
        run_demo(methods=["nonsense"])


def test_python_m_fastalign_demo_is_the_demo_command(capsys):
    from fastalign.cli import main  # what `python -m fastalign` runs

    assert main(["demo", "--methods", "sample", "--num-prompts", "1", "--max-new-tokens", "2"]) == 0
    assert "| sample |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
