"""Command-line options shared by the subcommands, and the checks that run before any model loads.

Every command that modifies a model reads one grammar: ``--recipe SPEC|FILE`` (repeatable; specs
joined by ``+``, or a YAML/JSON recipe file), with ``--drop``/``--prune``/``--quant`` kept as aliases
that append to the same recipe. Commands comparing several modifications take ``--method RECIPE``
(repeatable, one recipe each). Values are checked here, so bad input fails in a second.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from prunelens.data import builtin_prompts, read_texts
from prunelens.errors import PrunelensError
from prunelens.model.loading import DEFAULT_MODEL, load_tokenizer
from prunelens.model.placement import placement as make
from prunelens.prune.base import methods_help
from prunelens.prune.candidate import Candidate, load_candidate
from prunelens.prune.checkpoint import load_model
from prunelens.prune.importance import METRICS
from prunelens.prune.recipe import Calibration, Recipe, build
from prunelens.runs import check_writable_parent
from prunelens.tasks.config import load_config
from prunelens.tasks.config_file import is_task_config
from prunelens.tasks.registry import TaskOptions, check_task, tasks_help

# below this, z/T turns a 0.1-nat logit gap into 100 nats: the distribution is numerically one-hot
# (float32's exp underflows past ~-103) and a temperature says nothing a greedy argmax does not
MIN_TEMPERATURE = 1e-3


def temperatures(s: str) -> tuple[float, ...]:
    try:
        temps = tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise PrunelensError(f"temperatures must be numbers, got '{s}'") from None
    if not temps:
        raise PrunelensError("at least one temperature is needed")
    for t in temps:
        if not (t > 0 and math.isfinite(t)):
            raise PrunelensError(f"temperature must be positive, got {t:g}")
        if t < MIN_TEMPERATURE:
            raise PrunelensError(f"temperature {t:g} is below {MIN_TEMPERATURE:g}: softmax(z/T) is then one-hot "
                                 "for any logit gap above 0.1 (e^-100) and its KL is infinite or NaN; use "
                                 f"{MIN_TEMPERATURE:g} or more")
    return temps


def positive(name: str, v: int) -> int:
    if v < 1:
        raise PrunelensError(f"{name} must be at least 1, got {v}")
    return v


def fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset, local HF directory, .gguf file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every sample drawn: calibration windows, and the seeded sample of questions "
                        "--limit takes (default 0)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code from the hub (off by default)")
    big = p.add_argument_group("models larger than one device (accelerate's big-model inference)")
    big.add_argument("--device-map", help="auto, balanced, balanced_low_0, sequential, or a JSON file "
                     "{module: device}; replaces --device (default: the whole model on --device)")
    big.add_argument("--max-memory", help="per-device budget in accelerate's syntax, e.g. 0=70GiB,1=70GiB,"
                     "cpu=200GiB (implies --device-map auto)")
    big.add_argument("--offload-dir", help="folder for weights that fit no device budget (disk offload)")


def placement(args: argparse.Namespace):
    return make(getattr(args, "device_map", None), getattr(args, "max_memory", None),
                getattr(args, "offload_dir", None))


def load(args: argparse.Namespace):
    """The model, its --device-map checked against it before any work."""
    where = placement(args)
    lm = load_model(args.model, args.device, args.dtype, args.trust_remote_code, placement=where)
    check_device_map(lm.model, where.device_map, getattr(args, "device_map", None))
    return lm


def check_device_map(model: Any, device_map: Any, source: str | None) -> None:
    """A device map's names must be the model's modules (or parameters): accelerate ignores one it
    does not know, so a typo would leave that module wherever the rest went, without a word."""
    if not isinstance(device_map, dict):
        return
    known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    unknown = [k for k in device_map if k not in known]
    if unknown:
        example = next((n for n, _ in model.named_modules() if n.count(".") == 2), "model.layers.0")
        raise PrunelensError(f"--device-map {source}: no module named {', '.join(map(repr, unknown[:3]))}"
                             f"{' …' if len(unknown) > 3 else ''} in this model (names as in '{example}')")


class _AppendSpec(argparse.Action):
    """--recipe/--drop/--prune/--quant all append to one ordered list (``args.recipe``), tagged
    with the flag, so an alias can check that its spec is of its family."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "recipe", None) or [])
        items.append((self.const, values))
        namespace.recipe = items


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--importance", default="cosine", choices=list(METRICS),
                   help="ranking for KIND:N: cosine = 1-cos(in,out) (LLM-Drop / ShortGPT BI), "
                        "angular = best window of N consecutive blocks (Gromov et al.), "
                        "kl = greedy on the final next-token KL (slower: one forward per unit and drop), "
                        "ppl = greedy on calibration perplexity (SLEB for blocks; as slow as kl)")
    p.add_argument("--calib", help="calibration text (.txt or .jsonl with a 'text' field); "
                                   "default: a built-in sample")
    p.add_argument("--calib-samples", type=int,
                   help="calibration windows (default 8 to rank drops, 32 for weight methods)")
    p.add_argument("--calib-len", type=int,
                   help="tokens per calibration window (default 128 to rank drops, 256 for weight methods)")


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The one modification grammar of single-modification commands, and its aliases."""
    p.set_defaults(recipe=[])
    p.add_argument("--recipe", action=_AppendSpec, const="recipe", metavar="SPEC|FILE",
                   help="modification specs, repeatable or joined by '+', applied drops first, then weight "
                        "methods in order, each calibrated on the model as modified so far; or a YAML/JSON "
                        f"recipe file. Methods — {methods_help()}")
    p.add_argument("--drop", action=_AppendSpec, const="drop", metavar="SPEC",
                   help="alias: a drop spec, KIND:N (N least important) or KIND@i,j (those layers; i-j a range); "
                        "sleb:N = N blocks removed one at a time by calibration perplexity")
    p.add_argument("--prune", action=_AppendSpec, const="prune", metavar="SPEC",
                   help="alias: a sparsity spec, METHOD:RATIO or METHOD:N:M (e.g. wanda:0.5, sparsegpt:2:4, "
                        "owl:0.7 = Wanda at OWL's outlier-weighted ratio per layer)")
    p.add_argument("--quant", action=_AppendSpec, const="quant", metavar="SPEC",
                   help="alias: a fake-quantisation spec, METHOD:wBITS[gGROUP][s] (e.g. gptq:w4g128)")
    p.add_argument("--repair", action=_AppendSpec, const="repair", metavar="SPEC",
                   help="alias: a training-free repair of the drops, repair:linear|cosine|scale|bias (ReplaceMe-"
                        "style maps merged into the projection before each dropped span)")
    p.add_argument("--iterative", action="store_true", help="re-score after every drop")
    p.add_argument("--prune-skip", action="append", default=[], metavar="PATTERN",
                   help="leave these linear layers alone: a layer index or a glob on the module path "
                        "(e.g. 0, '*.mlp.down_proj'); repeatable")
    add_calibration_args(p)


def add_candidate_args(p: argparse.ArgumentParser) -> None:
    """--candidate: a compressed model made by any tool, compared with --model (its base) instead of a
    recipe's view of the base."""
    g = p.add_argument_group("a compressed model made elsewhere, compared with --model as its base")
    g.add_argument("--candidate", metavar="MODEL",
                   help="the compressed model: a local HF directory or hub id (compressed-tensors, GPTQ/AWQ on a GPU, "
                        "bitsandbytes), a .gguf file, a prunelens checkpoint; replaces --recipe")
    g.add_argument("--layer-map", metavar="FILE",
                   help="for a shallower candidate: JSON list of the base layer each candidate layer continues "
                        "(default: prunelens metadata, else inferred from hidden-state similarity)")


def candidate_spec(args: argparse.Namespace) -> str | None:
    """--candidate, checked before any model loads: not with a recipe, its layer map readable."""
    spec = getattr(args, "candidate", None)
    layer_map = getattr(args, "layer_map", None)
    if spec is None:
        if layer_map:
            raise PrunelensError("--layer-map needs --candidate")
        return None
    if getattr(args, "recipe", None):
        raise PrunelensError("give either --candidate (a model made elsewhere) or a recipe, not both")
    if layer_map and not Path(layer_map).is_file():
        raise PrunelensError(f"--layer-map {layer_map} does not exist")
    path = Path(spec).expanduser()
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1):
        raise PrunelensError(f"--candidate '{spec}' does not exist")
    model = str(getattr(args, "model", ""))
    if spec == model or (path.exists() and path.resolve() == Path(model).expanduser().resolve()):
        raise PrunelensError(f"candidate '{spec}' is the base model itself: every divergence would be 0 "
                             "(KL 0 is expected); name a compressed model")
    return spec


def candidate_tokenizer(args: argparse.Namespace) -> Any:
    """The candidate's tokenizer, read before the base loads (a GGUF candidate is converted now,
    while no model is in memory), so a mismatch stops a sequential run before the base's work."""
    return load_tokenizer(args.candidate, args.trust_remote_code)


def scoring_candidate(args: argparse.Namespace, base: Any) -> Candidate:
    """The candidate for scoring tasks or text, where no hidden state is compared (no layer
    correspondence). It reads its inputs through the base's tokenizer: the token ids are the same
    (checked on load), and the base's chat template then renders every prompt for both."""
    return load_candidate(args.candidate, base, device=args.device, dtype=args.dtype, placement=placement(args),
                          trust_remote_code=args.trust_remote_code, align=False)


def load_candidate_for(args: argparse.Namespace, base: Any, cal: Calibration, base_states: Any = None,
                       align: bool = True) -> Candidate:
    """The candidate on the base's device and dtype, lined up with the base (calibration windows of
    --calib infer the layer correspondence of a shallower candidate without metadata; ``base_states``
    are the base's streams on them when its weights are already freed)."""
    ids, _ = cal.ids(base, (8, 128))
    return load_candidate(args.candidate, base, device=args.device, dtype=args.dtype, placement=placement(args),
                          layer_map=args.layer_map, calibration=ids, base_states=base_states,
                          trust_remote_code=args.trust_remote_code, align=align)


def add_method_args(p: argparse.ArgumentParser) -> None:
    """--recipe (alias --method; repeatable, one modification each) and how they are calibrated."""
    p.add_argument("--recipe", "--method", dest="method", action="append", default=[], metavar="RECIPE",
                   required=True,
                   help="repeatable, one modification each: a spec (attn:4, wanda:0.5, gptq:w4g128), specs "
                        "joined by '+' (attn:2+wanda:0.5) or a YAML/JSON recipe file")
    add_calibration_args(p)


def calibration(args: argparse.Namespace) -> Calibration:
    cal = Calibration(path=args.calib, samples=args.calib_samples, seq_len=args.calib_len, seed=args.seed,
                      importance=args.importance, iterative=getattr(args, "iterative", False),
                      skip=tuple(getattr(args, "prune_skip", ()) or ()))
    cal.check()
    return cal


def recipe(args: argparse.Namespace) -> Recipe:
    """The command's recipe, each alias checked against its family (before any model loads)."""
    steps = []
    for flag, value in args.recipe:
        r = Recipe.parse(value)
        if flag != "recipe":
            for s in r.steps:
                if s.family != flag:
                    raise PrunelensError(f"'{s.text}' is a {s.family} spec; pass it to --{s.family} or --recipe")
        steps.extend(r.steps)
    return Recipe.parse(steps)  # parsed already: only the duplicates are checked


NOTHING_TO_DO = "nothing to do: give --recipe, --drop, --prune or --quant"


def required_recipe(args: argparse.Namespace, why: str = "") -> Recipe:
    """``recipe``, refused when empty: a command whose answer compares the model with its modified
    self would otherwise compare it with itself and report a perfect match."""
    return require(recipe(args), why)


def require(r: Recipe, why: str = "") -> Recipe:
    """An already-read recipe, refused when empty (see ``required_recipe``)."""
    if not r:
        raise PrunelensError(NOTHING_TO_DO + (f" ({why})" if why else ""))
    return r


def method_recipes(args: argparse.Namespace) -> dict[str, Recipe]:
    """--recipe (--method) values by their text, each parsed (duplicates refused)."""
    out: dict[str, Recipe] = {}
    for m in args.method:
        if m in out:
            raise PrunelensError(f"--recipe {m} is given twice")
        out[m] = Recipe.parse(m)
    return out


def build_methods(lm, recipes: dict[str, Recipe], cal: Calibration, progress: bool) -> dict[str, Any]:
    return {label: build(lm, r, cal, progress=progress) for label, r in recipes.items()}


def check_checkpoint_dir(out: Path, overwrite: bool) -> None:
    """A checkpoint replaces its folder whole (``runs.atomic_dir``), so --overwrite only ever
    replaces a model checkpoint, never a folder of other files."""
    if out.exists() and not out.is_dir():
        raise PrunelensError(f"'{out}' exists and is not a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and not overwrite:
        raise PrunelensError(f"output directory '{out}' is not empty (use --overwrite)")
    if nonempty and not (out / "config.json").is_file():
        raise PrunelensError(f"'{out}' is not empty and holds no model checkpoint; not overwriting it")
    check_writable_parent(out)


def add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", "--task", dest="tasks", required=True, help=f"comma-separated: {tasks_help()}")
    p.add_argument("--data-dir", help="directory with the tasks' local data files (docs/tasks.md); a task whose "
                   "file is not there loads its Hub dataset")
    p.add_argument("--limit", type=int, help="a seeded sample of N questions per task")
    p.add_argument("--generative-limit", type=int, metavar="N",
                   help="a different limit for gsm8k/humaneval/mbpp (they cost far more per question)")
    p.add_argument("--batch-size", type=int, default=8, help="questions or prompts per forward pass (default 8)")
    p.add_argument("--shots", type=int, default=5, help="GSM8K exemplars (default 5)")
    p.add_argument("--max-new-tokens", type=int,
                   help="generation limit (default: gsm8k 256, humaneval/mbpp 512, fidelity 64)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="generative prompts without the chat template")
    p.add_argument("--pooling", default="mean", choices=["mean", "last"], help="retrieval embedding pooling")
    p.add_argument("--prompts", help="fidelity prompts (.txt one per line, .jsonl, or a task config .yaml); "
                   "default: built-in set")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def task_setup(args: argparse.Namespace) -> tuple[list[str], Any]:
    """Task names (each checked, data included) and TaskOptions, before any model is loaded."""

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise PrunelensError("--tasks is empty")
    if args.limit is not None:
        positive("--limit", args.limit)
    if args.generative_limit is not None:
        positive("--generative-limit", args.generative_limit)
    positive("--batch-size", args.batch_size)
    if args.max_new_tokens is not None:
        positive("--max-new-tokens", args.max_new_tokens)
    if args.shots < 0:
        raise PrunelensError(f"--shots must be at least 0, got {args.shots}")
    for t in tasks:  # loads each task's data (a local file, or the Hub) before any model
        check_task(t, args.data_dir)
    prompts = tuple(prompt_texts(args.prompts)) if args.prompts else None
    opts = TaskOptions(limit=args.limit, generative_limit=args.generative_limit, seed=args.seed,
                       batch_size=args.batch_size, shots=args.shots,
                       max_new_tokens=args.max_new_tokens, chat_template=not args.no_chat_template,
                       pooling=args.pooling, prompts=prompts, progress=not args.quiet)
    return tasks, opts


def prompt_texts(path: str) -> list[str]:
    """Prompts of a .txt/.jsonl file, or of a task config .yaml (each row's zero-shot prompt)."""

    if is_task_config(path):
        return load_config(path).prompts()
    return read_texts(path, "prompt")


def prompts(args: argparse.Namespace) -> list[str]:
    """--prompts (or the built-in set), cut to --limit."""

    out = prompt_texts(args.prompts) if args.prompts else builtin_prompts()
    if getattr(args, "limit", None) is not None:
        out = out[:positive("--limit", args.limit)]
    return out


#: the help of flags many commands share, given where a command adds one without its own help;
#: ``%(default)s`` is each command's own default. ``fill_help`` is called once on the whole parser.
SHARED_HELP = {
    "--batch-size": "prompts or questions per forward pass (default %(default)s)",
    "--quiet": "no progress bars",
    "--no-chat-template": "send the bare prompts instead of the tokenizer's chat template",
    "--overwrite": "replace an existing output",
    "--temperature": "softmax temperature of the compared next-token distributions (default %(default)s)",
    "--temps": "temperatures, comma-separated, e.g. 1,0.5 (default %(default)s)",
    "--steps": "decoding steps per prompt (default %(default)s)",
    "--limit": "use only the first N prompts",
    "--calib": "calibration text (.txt or .jsonl with a 'text' field); default: a built-in sample",
    "--calib-samples": "calibration windows (default %(default)s)",
    "--calib-len": "tokens per calibration window (default %(default)s)",
    "--kind": "which units: attn, mlp or block (default %(default)s)",
}


def fill_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every option of every subcommand that has no help its shared help (``SHARED_HELP``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                fill_help(sub)
        elif not action.help:
            action.help = next((SHARED_HELP[o] for o in action.option_strings if o in SHARED_HELP), None)
    return parser


def add_output_args(p: argparse.ArgumentParser, default: str) -> None:
    """--out (a run directory, ``default`` when omitted), --overwrite and --quiet."""
    p.add_argument("--out", help=f"run directory (default {default})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
