"""Command line: ``fastalign generate | demo | eval | bench`` (also ``python -m fastalign ...``).

    fastalign generate --method bon --opt n=8 --target gpt2 --reward MODEL "Hello"
    fastalign generate --toy --method sss "w1 w2"            # the built-in toy world, offline
    fastalign generate --target model.gguf --chat --method bon --reward vader "Review a cafe."
    fastalign eval --toy --grid sample --grid "bon:n=2,4,8" --out-dir eval_out
    fastalign eval --world smollm2 --out-dir eval_smollm2  # a real instruct model from PyPI, VADER reward
    fastalign demo [--world smollm2]
    fastalign bench --list

Models are loaded inside the commands; ``--help`` loads none, and imports neither torch nor transformers
(the library is imported inside the commands), so that it answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

from .arguments import Parser, count, positive_int
from .errors import InputError
from .eval.grid import option_key, parse_value
from .eval.worlds import NAMES as WORLDS

DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
DEFAULT_SEED = 0  # generate and eval: reproducible unless another --seed is given
# torch's default (one thread per core) made toy-world decoding 15-36x slower when another process was busy on
# the same cores; one thread loses little when the machine is idle (docs/benchmarks.md, "CPU threads").
DEFAULT_THREADS = 1


# ------------------------------------------------------------------------------------------- parsing
def parse_options(pairs: list[str]) -> dict:
    """``["n=8", "tree=sampled"]`` -> ``{"n": 8, "tree": "sampled"}``."""
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--opt expects key=value, got {pair!r}")
        options[option_key(key)] = parse_value(value)
    return options


def check_options(method: str, options: dict) -> None:
    """A clear error for an option that ``method`` does not take or a bad value (before any model runs)."""
    from .methods import get_method

    try:
        run = get_method(method).run
    except ImportError as e:
        raise ValueError(f"method {method!r} is not available in this installation ({e})") from None
    from .validation import check_method_options

    check_method_options(method, run, options)


def seed_int(text: str) -> int:
    """An argparse type: a seed as ``decode`` takes it (``validation.check_seed``), checked before any model loads."""
    from .validation import check_seed

    try:
        return check_seed(int(text))
    except (ValueError, InputError) as e:  # int() of a non-number, or a seed out of range
        raise argparse.ArgumentTypeError(str(e) if isinstance(e, InputError) else
                                         f"expected an integer seed, got {text!r}") from None


def _torch_dtype(name: str | None):
    from .validation import check_dtype

    return check_dtype(name)


# ------------------------------------------------------------------------------------------- models
def engine_factory(args, world=None):
    """A function ``method -> fastalign.Engine`` for the models named on the command line; roles not named
    come from the world when one is given (``--world``, ``--toy``). With the toy world, ``sss`` takes its
    aligned draft as the draft (and the unaligned draft as ``ref``); other methods take the unaligned draft."""
    from .api import Engine
    from .methods import MODEL_ROLES as ROLES
    from .methods import world_roles

    named = {role: getattr(args, role) for role in ROLES}
    common = dict(trust_remote_code=args.trust_remote_code, device=args.device, dtype=_torch_dtype(args.dtype),
                  reward_tokenizer=args.reward_tokenizer, compile=getattr(args, "compile", False),
                  chat=args.chat or bool(getattr(world, "chat", False) and args.target is None))
    engines = {}

    def roles_for(method):
        if world is None:
            return named, args.tokenizer
        toy = world_roles(method, world)
        return {role: named[role] if named[role] is not None else toy[role] for role in ROLES}, \
            args.tokenizer or (world.tokenizer if named["target"] is None else None)

    def engine_for(method):
        roles, tokenizer = roles_for(method)
        key = tuple(id(roles[r]) if not isinstance(roles[r], str) else roles[r] for r in ROLES)
        if key not in engines:
            engines[key] = Engine(**roles, tokenizer=tokenizer, **common)
        return engines[key]

    return engine_for


def _world(args):
    """The world the command runs on: ``--world NAME``, ``--toy``, or the toy world when no target is named."""
    from .eval.worlds import load_world

    name = args.world or ("toy" if args.toy or args.target is None else None)
    return load_world(name, args.device, _torch_dtype(args.dtype)) if name else None


def _sampling(args, world) -> dict:
    """Sampling settings: the command line's, else the world's (when the target is the world's)."""
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    if args.temperature is None and world is not None and args.target is None:
        return {**given, **world.sampling}
    return given


# ------------------------------------------------------------------------------------------- commands
def _read_generate_prompts(args) -> list[str]:
    from .eval.prompts import parse_prompt_text, read_prompt_file

    if args.prompts_file:
        records = read_prompt_file(args.prompts_file, args.prompt_field)
    elif args.prompts:
        records = [{"prompt": p} for p in args.prompts]
    elif not sys.stdin.isatty():
        records = parse_prompt_text(sys.stdin.read(), args.prompt_field, where="stdin")
    else:
        records = []
    if not records:
        raise ValueError("no prompts: give them as arguments, with --prompts-file FILE, or on stdin")
    return [r["prompt"] for r in records]


def _check_output_file(path: str | None, flag: str) -> None:

    if path is not None and Path(path).is_dir():
        raise InputError(f"{flag} {path!r} is a directory; give a file path")
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise InputError(f"{flag} {path!r}: the folder {str(Path(path).parent)!r} does not exist")


def _resume_generate(args, prompts: list[str], options: dict, sampling: dict) -> tuple[int, list[dict]]:
    """``generate -o FILE --resume``, by the protocol of ``fastalign.eval.records``: every line of FILE must be
    this run's (line i: prompt i, and the method, options in effect and sampling settings, seed included, of
    this run), else an error; the lines of the batches whose every line is there are kept, and a partly
    written batch is decoded again (each prompt keeps its own seed). Returns ``(first batch to decode, lines to
    keep)``; the caller rewrites FILE with them."""
    from .eval.records import changed_settings, finished_batches, read_complete_jsonl

    previous = read_complete_jsonl(args.output)
    if len(previous) > len(prompts):
        raise InputError(f"--resume: {args.output} has {len(previous)} lines for {len(prompts)} prompts; "
                         "it is not an earlier part of this run")
    for n, (line, prompt) in enumerate(zip(previous, prompts), 1):
        this_run = {"prompt": prompt, "method": args.method, "options": options, "sampling": sampling}
        changed = changed_settings({key: line.get(key) for key in this_run}, this_run)
        if changed:
            raise InputError(f"--resume: line {n} of {args.output} is not this run's (differs in: "
                             f"{', '.join(changed)}); write to another file or drop --resume")
    batches = [range(start, min(start + args.batch_size, len(prompts)))
               for start in range(0, len(prompts), args.batch_size)]
    finished = finished_batches(dict(enumerate(previous)), batches)  # a line's key: its prompt's index
    first = sum(finished)  # the finished batches are the first ones: the lines are in prompt order
    return first, [previous[i] for batch in batches[:first] for i in batch]


def per_prompt_values(extra: dict, rows: int) -> list[dict]:
    """From a decode's ``out.extra``, the values that are one number or one list of numbers per prompt
    (e.g. ``bon``'s rewards, ``cards``' reward_threshold); others (trajectories) are left out. NaN and
    infinities become None."""
    import torch

    out = [{} for _ in range(rows)]
    for key, value in extra.items():
        value = value.tolist() if torch.is_tensor(value) else value
        if not isinstance(value, list) or len(value) != rows:
            continue
        flat = all(isinstance(v, (int, float)) or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))
                   for v in value)
        if flat:
            for i, v in enumerate(value):
                out[i][key] = [_json_number(x) for x in v] if isinstance(v, list) else _json_number(v)
    return out


def _json_number(x):
    """``x``, or None for NaN and infinities (JSON has no such numbers; e.g. a stopped candidate's reward)."""
    return x if not isinstance(x, float) or math.isfinite(x) else None


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    from .eval.records import append_jsonl, jsonable, rewrite_jsonl
    from .methods import get_method

    options = parse_options(args.opt)
    check_options(args.method, options)
    _check_output_file(args.output, "--output")
    if args.resume and not args.output:
        raise InputError("--resume continues an --output FILE: give one")
    prompts = _read_generate_prompts(args)
    spec = get_method(args.method)
    effective = {key: jsonable(v) for key, v in spec.options_in_effect(options).items()}
    world = _world(args)
    engine = engine_factory(args, world)(args.method)
    given = _sampling(args, world)
    temperature, top_k, top_p = spec.sampling_settings(given["temperature"], given["top_k"], given["top_p"])
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": temperature, "top_k": top_k,
                "top_p": top_p, "seed": args.seed}  # prompt i's own seed: prompt_seeds(seed, n)[i]
    first = 0
    if args.resume:
        first, kept = _resume_generate(args, prompts, effective, sampling)
        rewrite_jsonl(args.output, kept)  # drop a partly written batch (decoded again); atomic: a kill here
        # would otherwise lose the finished lines
    out = open(args.output, "a" if args.resume else "w", encoding="utf-8") if args.output else sys.stdout
    try:
        batches = range(0, len(prompts), args.batch_size)
        # prompt i's seed is derived from --seed and i alone, so the batch size does not change any output
        from .methods.base import prompt_seeds

        seeds = prompt_seeds(args.seed, len(prompts))
        for k, start in enumerate(tqdm(batches, desc="generate", unit="batch",
                                       disable=True if len(batches) == 1 else None)):
            if k < first:
                continue
            batch = prompts[start: start + args.batch_size]
            seed = seeds[start: start + args.batch_size]
            result = engine.decode(batch, method=args.method, max_new_tokens=args.max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **options)
            stats = {key: v for key, v in result.stats.items() if isinstance(v, (int, float, str, bool))}
            texts = result.texts or [None] * len(batch)
            values = per_prompt_values(result.extra, len(batch))
            lines = [{"prompt": prompt, "completion": text, "tokens": list(seq), "generated_tokens": len(seq),
                      **values[i], "method": args.method, "options": effective, "sampling": sampling,
                      "batch": {"index": k, "prompts": len(batch), "stats": stats}}
                     for i, (prompt, text, seq) in enumerate(zip(batch, texts, result.sequences))]
            append_jsonl(out, lines)  # one write per batch: an interrupt leaves whole lines
    finally:
        if out is not sys.stdout:
            out.close()
    if args.output:
        print(f"wrote {len(prompts)} completion{'s' * (len(prompts) != 1)} ({args.method}) to {args.output}",
              file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .eval.gold import GoldReward
    from .eval.grid import check_grid, default_grid, parse_grid
    from .eval.harness import evaluate
    from .eval.prompts import load_prompts
    from .eval.records import append_jsonl
    from .eval.report import summarize, summary_table, write_results
    from .methods import MODEL_ROLES as ROLES

    world = _world(args)
    engine_for = engine_factory(args, world)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {args.out_dir!r} is a file; give a folder")
    source = args.prompts or (world.name if world is not None else None)
    if source is None:
        raise ValueError("eval needs --prompts (a .jsonl/.txt file, 'hh-rlhf', 'gsm8k' or 'hf:NAME') "
                         "or a world (--world NAME, --toy)")
    records = load_prompts(source, args.limit, args.split, args.prompt_field, world)
    gold_spec = args.gold or (world.gold if world is not None else None)
    if gold_spec is None:
        raise ValueError("eval needs --gold (an HF reward model, 'module:function', 'vader', 'last_number' or 'toy')")
    gold = GoldReward.from_spec(gold_spec, engine_for("sample").tokenizer, getattr(world, "source", None),
                                args.trust_remote_code, args.device, _torch_dtype(args.dtype))
    if args.grid:
        grid = [entry for spec in args.grid for entry in parse_grid(spec)]
    elif world is not None and world.grid is not None and args.target is None:
        grid = list(world.grid)
    else:
        grid = default_grid(engine_for)
    if not any(method == args.baseline for method, _ in grid):
        grid.insert(0, (args.baseline, {}))  # the win rate needs the baseline
    for method, options in grid:  # all refused before the output folder is touched
        check_options(method, options)
    check_grid(grid, engine_for, getattr(world, "unavailable", None))
    sampling = _sampling(args, world)
    # the grid as JSON reads it back (tuples as lists), so that a resume compares like with like
    grid_setting = json.loads(json.dumps([[method, options] for method, options in grid]))
    settings = {"prompts": source, "num_prompts": len(records), "split": args.split, "gold": gold.name,
                "grid": grid_setting, "models": {role: getattr(args, role) for role in ROLES},
                "tokenizers": [args.tokenizer, args.reward_tokenizer], "device": args.device, "compile": args.compile,
                "world": getattr(world, "name", None),
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, **sampling,
                "batch_size": args.batch_size, "dtype": args.dtype, "chat": args.chat}
    done, results_path = _start_eval_run(out_dir, settings, args.resume)
    with open(results_path, "a", encoding="utf-8") as sink:
        def append(record):  # each record as its batch finishes: the file is valid JSONL after any interrupt
            append_jsonl(sink, [record])

        try:
            results = evaluate(records, grid, engine_for, gold, max_new_tokens=args.max_new_tokens,
                               seed=args.seed, **sampling, batch_size=args.batch_size,
                               progress=None if not args.no_progress else False, done=done, on_record=append)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"the records finished so far are in {results_path}; rerun the same command "
                                    "with --resume to continue") from None
    rows = summarize(results, args.baseline)
    header = (f"# fastalign eval\n\nprompts: {source} ({len(records)}), gold reward: {gold.name}, "
              f"max_new_tokens: {args.max_new_tokens}, seed: {args.seed}, batch size: {args.batch_size}\n\n"
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


EVAL_OUTPUTS = ("summary.md", "summary.json", "reward_vs_compute.png")
# settings that came later, with the value a run recorded before them had: compared only where given
LATER_SETTINGS = {"tokenizers": [None, None], "device": None, "compile": False}


def _given(settings: dict | None) -> dict | None:
    """``settings`` without the later settings at their defaults (``LATER_SETTINGS``), so that runs recorded
    with or without them compare alike."""
    if settings is None:
        return None
    return {k: v for k, v in settings.items() if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}


def _start_eval_run(out_dir: Path, settings: dict, resume: bool) -> tuple[list[dict], Path]:
    """Prepare ``out_dir`` for a run: returns the records to keep (``--resume``, by the protocol of
    ``fastalign.eval.records``: those of an earlier run whose settings, recorded in ``run.json``, are these, up
    to an interrupted last line) and the results file, which then holds exactly them. The summary and plot of
    an earlier run are removed first, so they never pass for this run's."""
    from .eval.records import changed_settings, read_complete_jsonl, replace_file, rewrite_jsonl

    out_dir.mkdir(parents=True, exist_ok=True)
    results, run_file = out_dir / "results.jsonl", out_dir / "run.json"
    done = []
    if resume and results.is_file():
        earlier = json.loads(run_file.read_text()) if run_file.is_file() else None
        changed = changed_settings(_given(earlier), _given(settings))
        if changed:
            raise InputError(f"--resume: {out_dir} holds a run with other settings (differs in: "
                             f"{', '.join(changed)}); use another --out-dir, or drop --resume to start over")
        done = read_complete_jsonl(results)
    for name in EVAL_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    replace_file(run_file, json.dumps(settings, indent=1) + "\n")
    rewrite_jsonl(results, done)  # atomic: a kill here leaves the earlier records, never a cut file
    return done, results


def cmd_demo(args) -> int:
    from .eval.demo import run_demo

    run_demo(methods=args.methods, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
             seed=args.seed, device=args.device, show=args.show, world=args.world, dtype=_torch_dtype(args.dtype),
             threads=args.threads)
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
    # a fresh folder unless one is named: the committed bench/results/ is only written when asked for
    explicit = any(a == "--out-dir" or a.startswith("--out-dir=") for a in args.bench_args)
    out_dir = None if explicit else Path(args.out_dir or f"bench_out/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    for i, name in enumerate(args.names, 1):
        where = "as its --out-dir says" if out_dir is None else str(out_dir)
        print(f"bench [{i}/{len(args.names)}] {name}: running (results to {where}; its own output follows)",
              file=sys.stderr, flush=True)
        start = time.perf_counter()
        extra = [] if out_dir is None else ["--out-dir", str(out_dir)]
        # -u: the script's progress lines appear as they are printed, also when piped
        code = subprocess.call([sys.executable, "-u", str(by_name[name]), *args.bench_args, *extra], cwd=folder.parent)
        print(f"bench [{i}/{len(args.names)}] {name}: {'done' if code == 0 else f'failed (exit {code})'} in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if code:
            return code
    return 0


# ------------------------------------------------------------------------------------------- parser
class HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, where it has one and the help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (HF names, local folders or .gguf files; omitted roles come from the world)")
    g.add_argument("--target", help="the target (policy) causal LM (a .gguf file brings its tokenizer)")
    g.add_argument("--draft", help="draft causal LM (sd; the aligned draft for sss)")
    g.add_argument("--ref", help="reference causal LM: the draft before alignment (sss)")
    g.add_argument("--reward", help="reward: a reward model (AutoModelForSequenceClassification, num_labels=1), "
                                    "'vader' (VADER sentiment of the response) or 'module:function' (called on "
                                    "texts: prompts, completions)")
    g.add_argument("--step-reward", help="reward of partial responses for smc and beam: a process reward model "
                                         "(AutoModelForTokenClassification, 2 labels), a reward model or "
                                         "'module:function' (default: the world's, else --reward)")
    g.add_argument("--tokenizer", help="tokenizer (default: the target's)")
    g.add_argument("--reward-tokenizer", help="the reward model's tokenizer when it differs from the policy's")
    g.add_argument("--toy", action="store_true", help="use the built-in toy world (offline, tiny models; its prompts "
                                                      "are review openings such as 'review : the pasta')")
    g.add_argument("--world", choices=WORLDS, help="a named world: toy, smollm2 (SmolLM2-135M-Instruct from PyPI, "
                                                   "chat prompts, VADER reward) or arith (arithmetic problems, "
                                                   "answer accuracy); see fastalign.eval.worlds")
    g.add_argument("--chat", action="store_true", help="render prompts with the tokenizer's chat template")
    g.add_argument("--trust-remote-code", action="store_true", help="allow models' custom code (off by default)")
    g.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: where the model loads)")
    g.add_argument("--dtype", choices=DTYPES, help="weights dtype (every model, the world's too; default: the "
                                                   "checkpoint's)")
    g.add_argument("--compile", action="store_true",
                   help="compiled path: static KV cache and torch.compile'd steps (first calls compile, slow)")
    g.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                   help="CPU threads of torch (see docs/benchmarks.md, CPU threads)")


def _sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens, help="tokens generated at most")
    g.add_argument("--temperature", type=float, help="default: the method's (from its paper), else 1.0")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (default: the method's, else all)")
    g.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: off)")
    g.add_argument("--seed", type=seed_int, default=DEFAULT_SEED, help="prompt i gets a seed derived from it and i, "
                                                                  "whatever --batch-size; the same seed gives the "
                                                                  "same outputs (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="prompts per decode call")


def build_parser() -> argparse.ArgumentParser:
    from .eval.demo import LABELS as DEMO_METHODS
    from .methods import METHODS

    parser = Parser(prog="fastalign", description="Fast, exact test-time alignment decoding.",
                    formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, **kwargs):
        return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    g = command("generate", help="decode prompts with a method; JSONL out",
                description="Decode prompts with a test-time alignment method. Prompts come from the arguments, "
                            "--prompts-file or stdin; one JSON line per prompt is written (prompt, completion, "
                            "tokens, generated_tokens, per-prompt values of the method such as rewards, method, "
                            "options in effect, sampling settings and seed, and the batch's stats).")
    g.add_argument("prompts", nargs="*", help="prompt texts")
    g.add_argument("--method", default="sample", choices=sorted(METHODS), help="decoding method")
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable (e.g. --opt n=8 --opt tree=sampled --opt branching=2,2)")
    g.add_argument("--prompts-file", help="text file (one prompt per line) or JSONL with a prompt field")
    g.add_argument("--prompt-field", default="prompt", help="JSONL field holding the prompt")
    g.add_argument("--output", "-o", help="JSONL output file (default: stdout)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep the whole batches already in --output, decode the rest")
    _model_arguments(g)
    _sampling_arguments(g, 128)
    g.set_defaults(func=cmd_generate)

    e = command("eval", help="methods x budgets on a prompt set, scored by a gold reward",
                description="Evaluate methods and budgets: mean gold reward, win rate against --baseline, calls and "
                            "tokens per model, wall time. Writes results.jsonl, summary.md, summary.json and "
                            "reward_vs_compute.png to --out-dir.")
    e.add_argument("--prompts", help="a world's name ('toy', 'smollm2', 'arith'), a .jsonl/.txt file, 'hh-rlhf' "
                                     "(Dahoas/full-hh-rlhf), 'gsm8k' or 'hf:NAME[:CONFIG]' (needs the datasets "
                                     "package) (default: the world's prompts with a world)")
    e.add_argument("--split", help="dataset split (default: test)")
    e.add_argument("--prompt-field", help="field holding the prompt (default: the dataset's, else 'prompt')")
    e.add_argument("--limit", type=positive_int, help="use the first N prompts (default: all)")
    e.add_argument("--gold", help="gold reward: an HF reward model, 'module:function' (called on texts: "
                                  "prompts, completions), 'toy', 'arith', 'vader', or 'last_number' / 'boxed' / 'option' / 'answer': the "
                                  "extracted answer equals the record's 'answer' field (GSM8K, MATH, multiple choice) "
                                  "(default: the world's gold reward with a world)")
    e.add_argument("--grid", action="append", metavar="SPEC",
                   help="METHOD[:key=v1,v2;key2=...], repeatable, e.g. --grid sample --grid 'bon:n=2,4,8' "
                        "(default: every available method at a few budgets)")
    e.add_argument("--baseline", default="sample", help="method the win rate compares with")
    e.add_argument("--out-dir", default="eval_out", help="folder for results.jsonl, the summary and the plot")
    e.add_argument("--no-plot", action="store_true", help="do not write reward_vs_compute.png")
    e.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    e.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out-dir (same settings): skip the (method, budget, "
                        "prompt) records already in results.jsonl")
    _model_arguments(e)
    _sampling_arguments(e, 64)
    e.set_defaults(func=cmd_eval)

    d = command("demo", help="every method on a world (default: the built-in toy world), on the CPU",
                description="Every method on a world (default: the built-in toy world, offline; smollm2: a real "
                            "instruct model from PyPI with the VADER reward): a few completions per method and a "
                            "table of gold reward, model calls, tokens and time.")
    d.add_argument("--world", default="toy", choices=WORLDS, help="the world to run on")
    d.add_argument("--methods", nargs="+", metavar="METHOD", choices=DEMO_METHODS,
                   help=f"demo settings to run: {' '.join(DEMO_METHODS)} (default: all)")
    d.add_argument("--num-prompts", type=positive_int, help="prompts, cycled (default: 32 on toy and arith, 8 on "
                                                                 "smollm2)")
    d.add_argument("--max-new-tokens", type=positive_int, help="tokens generated at most (default: 24 on toy, 48 "
                                                               "on smollm2, 32 on arith)")
    d.add_argument("--seed", type=seed_int, default=DEFAULT_SEED, help="seed of every method")
    d.add_argument("--device", help="e.g. cuda (default: cpu)")
    d.add_argument("--dtype", choices=DTYPES, help="weights dtype of the world's models")
    d.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                   help="CPU threads of torch (see docs/benchmarks.md, CPU threads)")
    d.add_argument("--show", type=count, default=2, help="completions printed per method")
    d.set_defaults(func=cmd_demo)

    b = command("bench", help="run the benchmark scripts of a source checkout (bench/)",
                description="List or run the scripts in the repository's bench/ folder; arguments after -- go to "
                            "the scripts. Results go to a fresh folder bench_out/DATE-TIME/ unless --out-dir (or an "
                            "--out-dir after --) names one: the committed bench/results/ is written only when named.")
    b.add_argument("names", nargs="*", help="benchmarks to run (file names without .py)")
    b.add_argument("--list", action="store_true", help="list the benchmarks")
    b.add_argument("--out-dir", help="folder for the results (default: a fresh bench_out/DATE-TIME/)")
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
    from .validation import check_device

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():  # warnings as one line each ("fastalign generate: warning: ...")
        warnings.showwarning = lambda message, *_, **__: print(f"fastalign {args.command}: warning: {message}",
                                                                file=sys.stderr)
        try:
            check_device(getattr(args, "device", None))  # before the toy world or any model moves there
            return args.func(args)
        except (InputError, ValueError, OSError) as e:  # bad input, missing or unwritable files: one line
            print(f"fastalign {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            print(f"fastalign {args.command}: interrupted{'; ' + str(e) if str(e) else ''}", file=sys.stderr)
            return 130
