"""Build the arithmetic world shipped in ``fastalign/data/arithworld/`` (tokenizer, target, reward model), on the CPU.

    python scripts/build_arith_world.py [--out DIR]

About 5 minutes of CPU time on one thread, 9 on a busy machine (one thread and fixed seeds: two builds on the
same machine and library versions write byte-identical files). Needs no download. The language, the rewards
and the checker are in ``fastalign.eval.arithworld``; the training helpers are the toy world's
(``scripts/build_toy_world.py``).

Steps (Llama-style ``transformers`` models, random init, trained here):

1. A corpus of ``CORPUS_SIZE`` problems from ``arithworld.generate_problem`` (the held-out problems, among them
   the world's prompts, are left out), each with a worked solution in which every step's result is wrong with
   probability ``arithworld.ERROR_RATE`` (later steps go on from the written result).
2. ``target``: a causal LM trained on ``prompt solution </s>`` by maximum likelihood.
3. ``reward``: a ``LlamaForSequenceClassification`` (one logit) of the target's size, initialised from the
   target's body (a new head), trained by logistic regression on ``REWARD_SIZE`` solutions: half from the
   generator with injected errors (``REWARD_ERROR_RATE``), half sampled from the target (finished ones). The
   score head is trained at every response token (``token_labels``; the model is an ordinary sequence
   classifier, read at the last token): at ``</s>`` the label is 1 when the final answer is right, before it
   1 while no step decided so far is wrong (``arithworld.check_steps``), so the score of a prefix means
   something to methods that score partial responses.
4. Measurements: the target's sampling accuracy at temperature 1 on ``EVAL_PROBLEMS`` held-out problems and on the
   world's prompts, the reward model's accuracy and the accuracy of the best of 8 samples by its score.

``manifest.json`` records the SHA-256 of every file written, the corpus hash, the settings, the library
versions and the measurements.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaForCausalLM, LlamaForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import build_toy_world as toy  # noqa: E402  (llama_config, train, lm_loss, reward_scores, save, sha256)

from fastalign.eval import arithworld as aw  # noqa: E402

CORPUS_SIZE, CORPUS_SEED = 40000, 0
REWARD_SIZE, REWARD_SEED, REWARD_ERROR_RATE = 40000, 1, 0.3
EVAL_PROBLEMS = 512  # held-out problems (the world's prompts are the first NUM_PROMPTS)
SAMPLE_CAP = 40  # tokens at most per sampled solution (the longest right one has 21)
TARGET = dict(hidden=96, layers=3, heads=4, steps=1500, lr=3e-3, seed=1)
# the reward model: the target's size and body (a new head), a label at every response token
REWARD = dict(init="target", labels="every token", steps=2500, lr=2e-3, seed=3)
MEASURE_SEED = 7


log = toy.log


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def token_labels(state: list, text: str) -> list[float]:
    """A label per response token (the words of ``text``, then ``</s>``): 1 while no step decided so far is wrong.

    A step is decided at its last word (its result; the ``;`` itself for an empty step), the final answer at its
    number; ``</s>`` is labelled by the answer (right or not)."""
    verdicts = aw.check_steps(state, text, finished=True)
    words, labels, k, ok, segment = text.split(), [], 0, True, []
    for j, word in enumerate(words):
        if word == aw.SEP:
            if not segment:  # an empty step: decided at its ";"
                ok = ok and verdicts[k]
            k, segment = k + 1, []
        else:
            segment.append(word)
            last_of_segment = j + 1 == len(words) or words[j + 1] == aw.SEP
            if last_of_segment:
                ok = ok and verdicts[k]
        labels.append(float(ok))
    return labels + [float(aw.answer_of(text) == str(aw.true_answer(state)))]


def dense_reward_loss(model, rows):
    """Logistic loss of the score head read at every labelled position (prompt positions carry no label)."""
    ids, labels = zip(*rows)
    tokens, mask = toy.pad_right(list(ids), pad=0)
    hidden = model.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    scores = model.score(hidden)[..., 0]  # [B, L]
    target = torch.full_like(scores, -1.0)
    for b, row in enumerate(labels):
        target[b, : len(row)] = torch.tensor([-1.0 if x is None else x for x in row])
    live = target >= 0
    return torch.nn.functional.binary_cross_entropy_with_logits(scores[live], target[live])


@torch.no_grad()
def sample_solutions(model, prompts: list[list[int]], eos: int, seed: int, batch: int = 1024) -> list[list[int]]:
    """One sample at temperature 1 per prompt (response tokens, ending at ``</s>`` or cut at ``SAMPLE_CAP``).
    Prompts are grouped by length so that no padding is needed."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, list[int]] = {}
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length in sorted(by_length):
        index = by_length[length]
        for start in range(0, len(index), batch):
            rows = index[start: start + batch]
            tokens = torch.tensor([prompts[i] for i in rows])
            done = torch.zeros(len(rows), dtype=torch.bool)
            cache, step_input = DynamicCache(), tokens
            while not done.all() and tokens.shape[1] - length < SAMPLE_CAP:
                logits = model(input_ids=step_input, past_key_values=cache, use_cache=True).logits[:, -1]
                nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)[:, 0]
                nxt = torch.where(done, torch.zeros_like(nxt), nxt)
                tokens, step_input = torch.cat([tokens, nxt[:, None]], 1), nxt[:, None]
                done |= nxt == eos
            for i, row in zip(rows, tokens[:, length:].tolist()):
                out[i] = row[: row.index(eos) + 1] if eos in row else row
    return [out[i] for i in range(len(prompts))]


def build_corpus(size: int, seed: int, error_rate: float, excluded: set) -> list[tuple[list, str, list[bool]]]:
    """``size`` problems (questions in ``excluded`` skipped) with solutions: ``(expression, text, injected)``."""
    rng, rows = random.Random(seed), []
    while len(rows) < size:
        state = aw.generate_problem(rng)
        if aw.question(state) in excluded:
            continue
        text, injected = aw.solution(state, rng, error_rate)
        rows.append((state, text, injected))
    return rows


def corpus_texts(rows) -> list[str]:
    """The training texts (without special tokens) of ``build_corpus`` rows; ``corpus_sha256`` hashes them."""
    return [aw.question(state) + " " + text for state, text, _ in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=aw.DATA_DIR)
    parser.add_argument("--error-rate", type=float, default=aw.ERROR_RATE, help="for tuning runs only")
    parser.add_argument("--target-from", type=Path, help="for tuning the reward model only: load the target of an "
                                                         "earlier build with the same settings instead of training it")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    tokenizer = aw.build_tokenizer()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    V = len(tokenizer)
    held_out = aw.held_out_problems(EVAL_PROBLEMS)
    excluded = {aw.question(s) for s in held_out}

    def corpus(size: int, seed: int, error_rate: float):
        return build_corpus(size, seed, error_rate, excluded)

    train_rows = corpus(CORPUS_SIZE, CORPUS_SEED, args.error_rate)
    texts = corpus_texts(train_rows)
    encoded = [encode(tokenizer, t) + [eos] for t in texts]
    metrics = {"corpus_right_fraction": sum(aw.answer_of(t) == str(aw.true_answer(s)) for s, t, _ in train_rows)
               / len(train_rows)}
    log(f"corpus: {len(texts)} solutions, vocabulary {V}, right {metrics['corpus_right_fraction']:.3f}, "
        f"longest {max(map(len, encoded))} tokens")

    torch.manual_seed(TARGET["seed"])
    target = LlamaForCausalLM(toy.llama_config(V, TARGET["hidden"], TARGET["layers"], TARGET["heads"]))
    if args.target_from is None:
        metrics["target_train_nll"] = toy.train(target, toy.lm_loss, encoded, TARGET["steps"], TARGET["lr"],
                                                TARGET["seed"], "target")
    else:
        target = LlamaForCausalLM.from_pretrained(args.target_from / "target").eval()
        metrics["target_train_nll"] = json.loads((args.target_from / "manifest.json").read_text())["metrics"][
            "target_train_nll"]

    # reward model: initialised from the target (it knows the arithmetic), trained on solutions of the generator
    # with injected errors and on the target's own samples, with a label at every response token
    # (``token_labels``): the score read at any prefix predicts "no wrong step so far", at </s> "answer right"
    solved = [(state, text) for state, text, _ in corpus(REWARD_SIZE // 2, REWARD_SEED, REWARD_ERROR_RATE)]
    problems = [state for state, _, _ in corpus(REWARD_SIZE // 2, REWARD_SEED + 1, 0.0)]
    prompt_ids = [encode(tokenizer, aw.question(s)) for s in problems]
    sampled = sample_solutions(target, prompt_ids, eos, REWARD_SEED + 2)
    solved += [(s, tokenizer.decode(r, skip_special_tokens=True)) for s, r in zip(problems, sampled)
               if eos in r]
    labelled = []
    for state, text in solved:
        prompt = encode(tokenizer, aw.question(state))
        ids = encode(tokenizer, aw.question(state) + " " + text) + [eos]
        labels = token_labels(state, text)
        assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + len(labels)
        labelled.append((ids, [None] * len(prompt) + labels))
    metrics["reward_data_positive_fraction"] = sum(labels[-1] for _, labels in labelled) / len(labelled)
    torch.manual_seed(REWARD["seed"])
    reward = LlamaForSequenceClassification(
        toy.llama_config(V, TARGET["hidden"], TARGET["layers"], TARGET["heads"], num_labels=1, pad_token_id=pad))
    reward.model.load_state_dict(target.model.state_dict())
    metrics["reward_train_bce"] = toy.train(reward, dense_reward_loss, labelled, REWARD["steps"], REWARD["lr"],
                                            REWARD["seed"], "reward")

    # measurements on held-out problems
    prompts = [encode(tokenizer, aw.question(s)) for s in held_out]
    truths = [str(aw.true_answer(s)) for s in held_out]
    draws = [sample_solutions(target, prompts, eos, MEASURE_SEED + k) for k in range(8)]
    right = torch.tensor([[float(aw.answer_of(tokenizer.decode(r, skip_special_tokens=True)) == t)
                           for r, t in zip(d, truths)] for d in draws])  # [8, P]
    scores = torch.stack([toy.score_rows(reward, [p + r for p, r in zip(prompts, d)]) for d in draws])  # [8, P]
    metrics["sample_accuracy"] = float(right.mean())
    metrics["sample_accuracy_prompts"] = float(right[:, : aw.NUM_PROMPTS].mean())
    metrics["finished_fraction"] = sum(eos in r for d in draws for r in d) / (8 * len(prompts))
    metrics["reward_accuracy_on_samples"] = float(((scores > 0).float() == right).float().mean())
    metrics["bon8_accuracy"] = float(right.gather(0, scores.argmax(0, keepdim=True)).mean())
    metrics["oracle8_accuracy"] = float(right.max(0).values.mean())
    log({k: round(v, 4) for k, v in metrics.items()})

    if args.out.exists():
        shutil.rmtree(args.out)
    for name, model in (("target", target), ("reward", reward)):
        toy.save(model, tokenizer, args.out / name, eos, bos, pad)
    toy.write_manifest(args.out, texts, dict(corpus_size=CORPUS_SIZE, corpus_seed=CORPUS_SEED,
                                             error_rate=args.error_rate, reward_size=REWARD_SIZE,
                                             reward_seed=REWARD_SEED, reward_error_rate=REWARD_ERROR_RATE,
                                             eval_problems=EVAL_PROBLEMS, sample_cap=SAMPLE_CAP, context=toy.CONTEXT,
                                             batch=toy.BATCH, target=TARGET, reward=REWARD, measure_seed=MEASURE_SEED),
                       metrics, start)


if __name__ == "__main__":
    main()
