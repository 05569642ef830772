"""Command line: ``fastalign generate | demo | eval | bench`` (also ``python -m fastalign ...``).

    fastalign generate --method bon --opt n=8 --target gpt2 --reward MODEL "Hello"
    fastalign generate --toy --method sss "w1 w2"            # the built-in toy world, offline
    fastalign eval --toy --grid sample --grid "bon:n=2,4,8" --out-dir eval_out
    fastalign demo
    fastalign bench --list

Models are loaded inside the commands; ``--help`` loads none.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .api import MODEL_ROLES as ROLES
from .api import Engine
from .evaluate import parse_value
from .models import InputError
from .methods.base import prompt_seeds

DTYPES = ("auto", "float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------- parsing
def parse_options(pairs: list[str]) -> dict:
    """``["n=8", "tree=sampled"]`` -> ``{"n": 8, "tree": "sampled"}``."""
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--opt expects key=value, got {pair!r}")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def check_options(method: str, options: dict) -> None:
    """A clear error for an option that ``method`` does not take (before any model runs)."""
    import inspect

    from .methods import get_method

    try:
        _, run = get_method(method)
    except ImportError as e:
        raise ValueError(f"method {method!r} is not available in this installation ({e})") from None
    params = inspect.signature(run).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [name for name in params if name not in ("ctx", "prompts")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(accepted) or 'none'}")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a count or a size), with a clear message otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _torch_dtype(name: str | None):
    if name is None or name == "auto":
        return name
    import torch

    return getattr(torch, name)


# ------------------------------------------------------------------------------------------- models
def engine_factory(args, world=None):
    """A function ``method -> fastalign.Engine`` for the models named on the command line; roles not named
    come from the toy world when one is given. With the toy world, ``sss`` takes its aligned draft as the
    draft (and the unaligned draft as ``ref``); other methods take the unaligned draft."""
    named = {role: getattr(args, role) for role in ROLES}
    common = dict(trust_remote_code=args.trust_remote_code, device=args.device, dtype=_torch_dtype(args.dtype),
                  reward_tokenizer=args.reward_tokenizer)
    engines = {}

    def roles_for(method):
        if world is None:
            return named, args.tokenizer
        toy = {role: getattr(world, role, None) for role in ROLES}
        if method == "sss" and getattr(world, "aligned_draft", None) is not None:
            toy["draft"] = world.aligned_draft
        return {role: named[role] if named[role] is not None else toy[role] for role in ROLES}, \
            args.tokenizer or world.tokenizer

    def engine_for(method):
        roles, tokenizer = roles_for(method)
        key = tuple(id(roles[r]) if not isinstance(roles[r], str) else roles[r] for r in ROLES)
        if key not in engines:
            engines[key] = Engine(**roles, tokenizer=tokenizer, **common)
        return engines[key]

    return engine_for


def _toy_world(args):
    from .evaluate import load_toy_world

    return load_toy_world(args.device) if args.toy or args.target is None else None


# ------------------------------------------------------------------------------------------- commands
def _read_generate_prompts(args) -> list[str]:
    from .evaluate import parse_prompt_lines, read_prompt_file

    if args.prompts_file:
        records = read_prompt_file(args.prompts_file, args.prompt_field)
    elif args.prompts:
        records = [{"prompt": p} for p in args.prompts]
    elif not sys.stdin.isatty():
        records = parse_prompt_lines(sys.stdin.read().splitlines(), args.prompt_field, where="stdin")
    else:
        records = []
    if not records:
        raise ValueError("no prompts: give them as arguments, with --prompts-file FILE, or on stdin")
    return [r["prompt"] for r in records]


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    from .evaluate import _jsonable

    options = parse_options(args.opt)
    check_options(args.method, options)
    prompts = _read_generate_prompts(args)
    world = _toy_world(args)
    engine = engine_factory(args, world)(args.method)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        batches = range(0, len(prompts), args.batch_size)
        # prompt i's seed is derived from --seed and i alone, so the batch size does not change any output
        seeds = None if args.seed is None else prompt_seeds(args.seed, len(prompts))
        for start in tqdm(batches, desc="generate", unit="batch", disable=True if len(batches) == 1 else None):
            batch = prompts[start: start + args.batch_size]
            seed = None if seeds is None else seeds[start: start + args.batch_size]
            result = engine.decode(batch, method=args.method, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed,
                                   **options)
            stats = {key: v for key, v in result.stats.items() if isinstance(v, (int, float, str, bool))}
            texts = result.texts or [None] * len(batch)
            for prompt, text, seq in zip(batch, texts, result.sequences):
                line = {"prompt": prompt, "completion": text, "tokens": list(seq), "method": args.method,
                        "options": {key: _jsonable(v) for key, v in options.items()}, "stats": stats}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def cmd_eval(args) -> int:
    from .evaluate import (
        GoldReward,
        default_grid,
        evaluate,
        load_prompts,
        parse_grid,
        summarize,
        summary_table,
        write_results,
    )

    world = _toy_world(args)
    engine_for = engine_factory(args, world)
    source = args.prompts or ("toy" if world is not None else None)
    if source is None:
        raise ValueError("eval needs --prompts (a .jsonl/.txt file, 'hh-rlhf', 'gsm8k' or 'hf:NAME') "
                         "or the toy world (--toy)")
    records = load_prompts(source, args.limit, args.split, args.prompt_field, world)
    gold_spec = args.gold or ("toy" if world is not None else None)
    if gold_spec is None:
        raise ValueError("eval needs --gold (an HF reward model, 'module:function', 'last_number' or 'toy')")
    gold = GoldReward.from_spec(gold_spec, engine_for("sample").tokenizer, world, args.trust_remote_code,
                                args.device, _torch_dtype(args.dtype))
    grid = [entry for spec in args.grid for entry in parse_grid(spec)] if args.grid else default_grid(engine_for)
    for method, options in grid:
        check_options(method, options)
    if not any(method == args.baseline for method, _ in grid):
        grid.insert(0, (args.baseline, {}))  # the win rate needs the baseline
    results = evaluate(records, grid, engine_for, gold, max_new_tokens=args.max_new_tokens, seed=args.seed or 0,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       batch_size=args.batch_size, progress=None if not args.no_progress else False)
    rows = summarize(results, args.baseline)
    header = (f"# fastalign eval\n\nprompts: {source} ({len(records)}), gold reward: {gold.name}, "
              f"max_new_tokens: {args.max_new_tokens}, seed: {args.seed or 0}, batch size: {args.batch_size}\n\n"
              "Per-prompt means; costs of a batched decode are shared equally by its prompts.\n\n")
    plot = not args.no_plot
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("note: matplotlib is not installed, so no plot (pip install matplotlib)", file=sys.stderr)
            plot = False
    paths = write_results(results, rows, args.out_dir, plot=plot, header=header)
    print(summary_table(rows), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(methods=args.methods, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
             seed=args.seed, device=args.device, show=args.show)
    return 0


def bench_dir() -> Path | None:
    """The ``bench/`` folder of a source checkout, or None in an installed package."""
    root = Path(__file__).resolve().parent.parent
    return root / "bench" if (root / "bench").is_dir() and (root / "setup.py").is_file() else None


def bench_scripts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.py") if not p.name.startswith("_") and p.name != "common.py")


def cmd_bench(args) -> int:
    folder = bench_dir()
    scripts = bench_scripts(folder) if folder is not None else []
    if not scripts:
        print("The benchmarks are scripts in the bench/ folder of the fastalign repository: run "
              "`python -m fastalign bench` (or `python bench/NAME.py`) from a source checkout.", file=sys.stderr)
        return 1
    if args.list or not args.names:
        print("benchmarks in " + str(folder) + ":")
        for p in scripts:
            print("  " + p.stem)
        if not args.names:
            print("run one with: fastalign bench NAME [-- ARGS]")
        return 0
    by_name = {p.stem: p for p in scripts}
    for name in args.names:
        if name not in by_name:
            raise ValueError(f"unknown benchmark {name!r}; available: {sorted(by_name)}")
    for name in args.names:
        code = subprocess.call([sys.executable, str(by_name[name]), *args.bench_args], cwd=folder.parent)
        if code:
            return code
    return 0


# ------------------------------------------------------------------------------------------- parser
def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (HF names or local paths; omitted roles come from the toy world)")
    g.add_argument("--target", help="the target (policy) causal LM")
    g.add_argument("--draft", help="draft causal LM (sd; the aligned draft for sss)")
    g.add_argument("--ref", help="reference causal LM: the draft before alignment (sss)")
    g.add_argument("--reward", help="reward model (AutoModelForSequenceClassification)")
    g.add_argument("--tokenizer", help="tokenizer (default: the target's)")
    g.add_argument("--reward-tokenizer", help="the reward model's tokenizer when it differs from the policy's")
    g.add_argument("--toy", action="store_true", help="use the built-in toy world (offline, tiny models)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow models' custom code (off by default)")
    g.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: where the model loads)")
    g.add_argument("--dtype", choices=DTYPES, help="weights dtype when loading by name")


def _sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, help="default: the method's (from its paper), else 1.0")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, help="prompt i gets a seed derived from it and i (outputs do not depend on "
                                            "--batch-size)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="prompts per decode call (default 16)")


def build_parser() -> argparse.ArgumentParser:
    from .demo import METHODS as DEMO_METHODS
    from .methods import METHODS

    parser = argparse.ArgumentParser(prog="fastalign", description="Fast, exact test-time alignment decoding.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser("generate", help="decode prompts with a method; JSONL out",
                       description="Decode prompts with a test-time alignment method. Prompts come from the "
                                   "arguments, --prompts-file or stdin; one JSON line per prompt is written "
                                   "(prompt, completion, tokens, method, options, stats of its decode call).")
    g.add_argument("prompts", nargs="*", help="prompt texts")
    g.add_argument("--method", default="sample", choices=sorted(METHODS))
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --opt n=8 --opt tree=sampled --opt branching=2,2)")
    g.add_argument("--prompts-file", help="text file (one prompt per line) or JSONL with a prompt field")
    g.add_argument("--prompt-field", default="prompt", help="JSONL field holding the prompt (default: prompt)")
    g.add_argument("--output", "-o", help="JSONL output file (default: stdout)")
    _model_arguments(g)
    _sampling_arguments(g, 128)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="methods x budgets on a prompt set, scored by a gold reward",
                       description="Evaluate methods and budgets: mean gold reward, win rate against --baseline, "
                                   "calls and tokens per model, wall time. Writes results.jsonl, summary.md, "
                                   "summary.json and reward_vs_compute.png to --out-dir.")
    e.add_argument("--prompts", help="'toy', a .jsonl/.txt file, 'hh-rlhf' (Dahoas/full-hh-rlhf), 'gsm8k' or "
                                     "'hf:NAME[:CONFIG]' (needs the datasets package)")
    e.add_argument("--split", help="dataset split (default: test)")
    e.add_argument("--prompt-field", help="field holding the prompt")
    e.add_argument("--limit", type=positive_int, help="use the first N prompts")
    e.add_argument("--gold", help="gold reward: an HF reward model, 'module:function' (called on texts: "
                                  "prompts, completions), 'toy', or 'last_number' / 'boxed' / 'option': the "
                                  "extracted answer equals the record's 'answer' field (GSM8K, MATH, multiple choice)")
    e.add_argument("--grid", action="append", metavar="SPEC",
                   help="METHOD[:key=v1,v2;key2=...], repeatable, e.g. --grid sample --grid 'bon:n=2,4,8' "
                        "(default: every available method at a few budgets)")
    e.add_argument("--baseline", default="sample", help="method the win rate compares with (default: sample)")
    e.add_argument("--out-dir", default="eval_out")
    e.add_argument("--no-plot", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    _model_arguments(e)
    _sampling_arguments(e, 64)
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="every method on the built-in toy world, on the CPU",
                       description="Every method on the built-in toy world (offline): a few completions per "
                                   "method and a table of gold reward, model calls, tokens and time.")
    d.add_argument("--methods", nargs="+", metavar="METHOD", choices=DEMO_METHODS,
                   help=f"demo settings to run: {' '.join(DEMO_METHODS)} (default: all)")
    d.add_argument("--num-prompts", type=positive_int, default=32)
    d.add_argument("--max-new-tokens", type=positive_int, default=24)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device")
    d.add_argument("--show", type=int, default=2, help="completions printed per method")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run the benchmark scripts of a source checkout (bench/)",
                       description="List or run the scripts in the repository's bench/ folder; arguments "
                                   "after -- go to the scripts.")
    b.add_argument("names", nargs="*", help="benchmarks to run (file names without .py)")
    b.add_argument("--list", action="store_true", help="list the benchmarks")
    b.set_defaults(func=cmd_bench, bench_args=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastalign`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = []
    if "--" in argv:  # everything after -- goes to the benchmark scripts
        cut = argv.index("--")
        argv, bench_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        args.bench_args = bench_args
    try:
        return args.func(args)
    except (InputError, ValueError, FileNotFoundError) as e:
        print(f"fastalign {args.command}: error: {e}", file=sys.stderr)
        return 2
