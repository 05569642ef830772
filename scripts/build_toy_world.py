"""Build the toy world shipped in ``fastalign/data/toyworld/`` (tokenizer and four models), on the CPU.

    python scripts/build_toy_world.py [--out DIR]

About 2 minutes of CPU time on one thread (one thread and fixed seeds: two builds on the same machine and
library versions write byte-identical files). Needs no download.

Steps (all Llama-style ``transformers`` models, random init, trained here):

1. A corpus of ``CORPUS_SIZE`` reviews from the grammar of ``fastalign.eval.toyworld`` (mostly neutral/negative).
2. ``target``: a causal LM (hidden 64, 3 layers) trained on the corpus by maximum likelihood.
3. ``draft``: a smaller causal LM (hidden 48, 2 layers) trained on the same corpus; it is also the ``ref``
   of reward-shifted speculative sampling (the draft before alignment).
4. ``reward``: a ``LlamaForSequenceClassification`` (one label, hidden 48, 2 layers) trained by least squares
   to predict ``REWARD_SCALE * gold_reward_text(prefix)`` for random prefixes of corpus reviews (prefixes too, so
   that segment-level methods such as CARDS and ARGS get meaningful partial scores).
5. ``aligned_draft``: the draft fine-tuned towards the tilted distribution ``q(y) * exp(r(y) / ALIGN_BETA) / Z``
   with ``q`` the draft and ``r`` the reward model, by *reward-weighted fine-tuning*: ``ALIGN_SAMPLES`` reviews
   are sampled from ``q``, resampled with probabilities proportional to ``exp(r / ALIGN_BETA)`` (sampling
   importance resampling) and the draft is fine-tuned on them by maximum likelihood. The population optimum
   of this objective is exactly the tilted distribution, so ``q_r / q`` carries the reward as in
   ``q_r ∝ q * exp(r / beta)`` (up to the fine-tuning's approximation error). Tilting the joint over the whole
   review also tilts every conditional: ``q_r(y | x) ∝ q(y | x) * exp(r(x, y) / beta)`` for any opening ``x``.

``manifest.json`` records the SHA-256 of every file written, the corpus hash, the settings, the library
versions and a few measurements (losses, reward-model fit, gold reward of ref vs aligned samples).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastalign.eval import toyworld  # noqa: E402

CORPUS_SIZE, CORPUS_SEED = 30000, 0
CONTEXT = 256  # max_position_embeddings (RoPE: nothing learned per position); reviews are at most 26 tokens
SAMPLE_CAP = 48  # tokens at most per sampled review (every one ends with </s> well before)
TARGET = dict(hidden=64, layers=3, heads=4, steps=800, lr=3e-3, seed=1)
DRAFT = dict(hidden=48, layers=2, heads=4, steps=600, lr=3e-3, seed=2)
REWARD = dict(hidden=48, layers=2, heads=4, steps=500, lr=2e-3, seed=3)
ALIGN_SAMPLES, ALIGN_BETA, ALIGN_SEED = 16384, 2.0, 4  # ALIGN_BETA is in reward-model units
ALIGN = dict(steps=300, lr=1e-3, seed=5)
BATCH = 64


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def llama_config(vocab_size: int, hidden: int, layers: int, heads: int, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=CONTEXT, tie_word_embeddings=True, **extra)


def pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [B, L]`` and ``mask [B, L]`` (True on real tokens)."""
    L = max(len(r) for r in rows)
    tokens = torch.full((len(rows), L), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.tensor(r)
    return tokens, tokens != pad


def schedule(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10%."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm))))


def train(model, batch_loss, data, steps: int, lr: float, seed: int, name: str) -> float:
    """AdamW on ``batch_loss(model, rows)`` over batches of ``data`` drawn without replacement per epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    order, pos, recent = torch.randperm(len(data), generator=gen), 0, []
    for step in range(steps):
        if pos + BATCH > len(data):
            order, pos = torch.randperm(len(data), generator=gen), 0
        rows = [data[i] for i in order[pos: pos + BATCH].tolist()]
        pos += BATCH
        for group in opt.param_groups:
            group["lr"] = schedule(step, steps, lr)
        loss = batch_loss(model, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 200 == 0 or step == steps - 1:
            log(f"{name} step {step}/{steps} loss {sum(recent) / len(recent):.4f}")
    model.eval()
    return sum(recent) / len(recent)


def lm_loss(model, rows):
    tokens, mask = pad_right(rows, pad=0)
    return model(input_ids=tokens, attention_mask=mask.long(), labels=tokens.masked_fill(~mask, -100)).loss


def reward_scores(model, rows) -> torch.Tensor:
    """The reward head read at each row's last token (right padding, causal attention).  [B] fp32."""
    tokens, mask = pad_right(rows, pad=0)
    hidden = model.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    last = mask.sum(1) - 1
    return model.score(hidden[torch.arange(len(rows)), last])[:, 0]


def reward_loss(model, rows):
    ids, targets = zip(*rows)
    return torch.nn.functional.mse_loss(reward_scores(model, list(ids)), torch.tensor(targets))


@torch.no_grad()
def sample_reviews(model, num: int, bos: int, eos: int, seed: int, batch: int = 2048) -> list[list[int]]:
    """``num`` ancestral samples from ``<s>``, each ending at ``</s>`` (all rows have the same length: no padding)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        tokens = torch.full((n, 1), bos)
        done = torch.zeros(n, dtype=torch.bool)
        cache, step_input = DynamicCache(), tokens
        while not done.all() and tokens.shape[1] < SAMPLE_CAP:
            logits = model(input_ids=step_input, past_key_values=cache, use_cache=True).logits[:, -1]
            nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)[:, 0]
            nxt = torch.where(done, torch.zeros_like(nxt), nxt)
            tokens, step_input = torch.cat([tokens, nxt[:, None]], 1), nxt[:, None]
            done |= nxt == eos
        for row in tokens.tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


@torch.no_grad()
def score_rows(model, rows: list[list[int]], batch: int = 2048) -> torch.Tensor:
    return torch.cat([reward_scores(model, rows[i: i + batch]) for i in range(0, len(rows), batch)])


def save(model, tokenizer, path: Path, eos: int, bos: int, pad: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.config.update(dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad))
    if isinstance(model, LlamaForCausalLM):
        model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    config_file = path / "tokenizer_config.json"  # a class name that transformers 4.x loads too
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_manifest(out: Path, corpus: list[str], settings: dict, metrics: dict, start: float) -> None:
    """``out/manifest.json``: the checksum of every file under ``out``, of the corpus, the build settings, the
    library versions and the measured metrics; then a line on what was written (``start``: ``perf_counter``)."""
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = {
        "files": {str(p.relative_to(out)): sha256(p) for p in files},
        "corpus_sha256": hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
        "settings": settings,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in files)
    log(f"wrote {len(files)} files ({total / 1e6:.2f} MB) to {out} in {time.perf_counter() - start:.0f} s")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=toyworld.DATA_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)  # bitwise reproducible: no thread-count-dependent reductions
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    tokenizer = toyworld.build_tokenizer()
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    corpus = toyworld.generate_corpus(CORPUS_SIZE, CORPUS_SEED)
    encoded = [tokenizer(text)["input_ids"] + [eos] for text in corpus]
    V = len(tokenizer)

    def gold_of(ids: list[int]) -> float:
        return toyworld.gold_reward_text(tokenizer.decode(ids, skip_special_tokens=True))

    log(f"corpus: {len(corpus)} reviews, vocabulary {V}, "
        f"mean gold {sum(map(toyworld.gold_reward_text, corpus)) / len(corpus):.3f}")
    metrics = {}

    models = {}
    for name, spec in (("target", TARGET), ("draft", DRAFT)):
        torch.manual_seed(spec["seed"])
        model = LlamaForCausalLM(llama_config(V, spec["hidden"], spec["layers"], spec["heads"]))
        metrics[f"{name}_train_nll"] = train(model, lm_loss, encoded, spec["steps"], spec["lr"], spec["seed"],
                                             name)
        models[name] = model

    # reward model: least squares on REWARD_SCALE * gold of random prefixes (at least "<s> review :")
    gen = torch.Generator().manual_seed(REWARD["seed"])
    cuts = [int(torch.randint(3, len(ids) + 1, (1,), generator=gen)) for ids in encoded]
    prefixes = [ids[:c] for ids, c in zip(encoded, cuts)]
    labelled = [(p, toyworld.REWARD_SCALE * gold_of(p)) for p in prefixes]
    torch.manual_seed(REWARD["seed"])
    reward = LlamaForSequenceClassification(
        llama_config(V, REWARD["hidden"], REWARD["layers"], REWARD["heads"], num_labels=1, pad_token_id=pad))
    metrics["reward_train_mse"] = train(reward, reward_loss, labelled, REWARD["steps"], REWARD["lr"],
                                        REWARD["seed"], "reward")

    # aligned draft: reward-weighted fine-tuning of the draft (sampling importance resampling + MLE)
    draft = models["draft"]
    samples = sample_reviews(draft, ALIGN_SAMPLES, bos, eos, ALIGN_SEED)
    r = score_rows(reward, samples)
    gold = torch.tensor([gold_of(s) for s in samples])
    weights = torch.softmax(r / ALIGN_BETA, 0)
    metrics["reward_vs_gold_corr_on_draft_samples"] = float(torch.corrcoef(torch.stack([r, gold]))[0, 1])
    metrics["align_effective_sample_size"] = float(1 / (weights**2).sum())
    metrics["ref_mean_gold"] = float(gold.mean())
    metrics["tilted_mean_gold"] = float((weights * gold).sum())  # what the aligned draft aims at
    picks = torch.multinomial(weights, ALIGN_SAMPLES, replacement=True,
                              generator=torch.Generator().manual_seed(ALIGN_SEED))
    resampled = [samples[i] for i in picks.tolist()]
    aligned = LlamaForCausalLM(draft.config)
    aligned.load_state_dict(draft.state_dict())
    metrics["aligned_train_nll"] = train(aligned, lm_loss, resampled, ALIGN["steps"], ALIGN["lr"], ALIGN["seed"],
                                         "aligned")
    check = sample_reviews(aligned, 4096, bos, eos, ALIGN_SEED + 1)
    metrics["aligned_mean_gold"] = sum(map(gold_of, check)) / len(check)
    log({k: round(v, 4) for k, v in metrics.items()})

    if args.out.exists():
        shutil.rmtree(args.out)
    for name, model in (("target", models["target"]), ("draft", draft), ("aligned_draft", aligned),
                        ("reward", reward)):
        save(model, tokenizer, args.out / name, eos, bos, pad)
    write_manifest(args.out, corpus, dict(corpus_size=CORPUS_SIZE, corpus_seed=CORPUS_SEED, context=CONTEXT,
                                          sample_cap=SAMPLE_CAP, batch=BATCH, target=TARGET, draft=DRAFT,
                                          reward=REWARD, align=ALIGN, align_samples=ALIGN_SAMPLES,
                                          align_beta=ALIGN_BETA, align_seed=ALIGN_SEED,
                                          reward_scale=toyworld.REWARD_SCALE), metrics, start)


if __name__ == "__main__":
    main()
