"""The SPIN iteration driver: generate -> pairs -> reference log-probs -> train -> save, T times.

    python -m minispin --model zephyr-7b-sft-full --data ultrachat_200k --split train_sft \\
        --limit 50000 --output_dir runs/spin        # under torchrun the same command, every rank

For t = 0..T-1 (iteration t starts from theta_t: the input model for t = 0, else iteration t-1's result):
1. generate: theta_t answers every SFT prompt (`minispin.generation_job`, resumable, one row per prompt)
   -> <run>/iter<t>/generated.jsonl
2. pairs: `build_pairs(examples, config)` turns rows with generated answers into `Pair`s (SPIN: chosen =
   real answer, rejected = generated). From iteration 1 the previous iteration's pairs are added
   (`mix_previous`, as the paper does: 50k pairs at iteration 0, 100k after).
3. reference: summed log-probs of both answers of every pair under theta_t, once
   -> <run>/iter<t>/reference_logps.jsonl
4. train (`minispin.training.train`) -> <run>/iter<t>/metrics.jsonl, resumable <run>/iter<t>/train_state/
5. save theta_{t+1} as an HF safetensors folder (+ tokenizer files) -> <run>/iter<t>/model/
   (LoRA, --lora_r R: fresh adapters on theta_t every iteration, merged into <iter>/model/; the adapters
   alone, in PEFT's layout with theta_t as their base, -> <run>/iter<t>/adapter/)

Resume: every phase's output is written atomically; a phase is done when the sizes and digests of its
files recorded in <iter>/phases.json still match (a damaged output is refused, naming the file);
generation and the reference pass keep resumable part files; training keeps a checkpoint every
`train.save_steps` steps. After a kill -9 at any point the same command continues (on CPU it ends with
the same weights as an uninterrupted run). <run>/state.json says where the run is; <run>/config.json is
the config it started with (a resumed run with a different config is refused, naming the changed
options); <run>/inputs.json fingerprints the data files (a resume over changed data is refused).
One job at a time: the run directory is locked (<run>/.lock) for the whole job, and temp files of
interrupted writes are removed when a job starts (`minispin.runs`).

Methods plug in at one seam: a `Method` names whether it needs generation, the loss family of
TrainConfig ("spin" pairwise / "sft"), and its pair builder `(examples, config) -> list[Pair]`; optionally
how it reads the data, a step that attaches judge scores (cached in <iter>/judge_scores/), a summary
of its per-pair decisions (<iter>/pair_stats.json, <run>/pair_stats.jsonl, status line), its default
schedule and a fixed loss type. Built in (`minispin.methods`): "spin" (default), "sft" (continued SFT on the real answers,
the paper's baseline), "dpo", "judge_spin", "noise_spin", "adaptive",
"sppo" (docs/methods.md). `generate=False` trains on the answers already in the data instead.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Sequence

import torch

from . import distributed as dist
from .checkpoint import load_config, load_model
from .collate import Pair, TruncationReport
from .config import (RECIPE, ConfigError, field_default, given_names, lookup, records_given, resume_free_names,
                     to_dict, winner)
from .config import replace as replace_config
from .data import DATA_SUFFIXES, DataError, Example, data_files, read_examples
from .generation_job import GenerationConfig, run_generation_job
from .gguf import is_gguf
from .io import atomic_write_json, atomic_write_text, recover_replaced_dir
from .log import UserError, print0, warn0
from .lora import save_adapter
from .runs import (PHASES_NAME, RunError, changed_inputs, changed_settings, check_manifest, describe_changes,
                   fingerprint_inputs, lock_run, metrics_summary, phase_done, read_manifest, read_metrics,
                   record_phase, remove_temp_files, write_manifest)
from .methods import METHODS, PAPER_SCHEDULE, JudgeConfig, Method, describe_counts, get_method, register_method
from .tokenizer import check_tokenizer_fits, load_tokenizer
from .training import TrainConfig, save_trained_model, train

__all__ = ["RunConfig", "RunResult", "Pair", "Method", "METHODS", "register_method", "build_pairs", "spin",
           "PAPER_SCHEDULE", "Iteration", "resolve", "run_record"]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


@records_given
@dataclass
class RunConfig:
    """A whole run of SPIN or a relative (`method`). Defaults follow the SPIN paper (zephyr-7b-sft-full on
    UltraChat200k, 4 iterations).

    Settings resolve by one rule (minispin.config): the method's recipe < a --config file < what was given
    (command line, or passed to a constructor here / in TrainConfig, GenerationConfig, JudgeConfig)."""

    # settings of the whole run that generation and training share: they live here only (the driver
    # writes them into each iteration's TrainConfig / GenerationConfig, with train.objective from `method`)
    RUN_LEVEL: ClassVar[tuple[str, ...]] = ("template", "max_prompt_length", "seed")
    # may change between a run and its resume (minispin.config; num_iterations: a finished run may be
    # extended by more iterations); the sections list their own
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("output_dir", "allow_config_change", "num_iterations",
                                              "keep_train_state")
    SET_BY_RUN: ClassVar[tuple[str, ...]] = ("train.template", "train.max_prompt_length", "train.seed",
                                             "train.objective", "generation.template",
                                             "generation.max_prompt_length", "generation.seed")

    model: str = ""  # the starting (SFT) model: an HF safetensors folder
    data: str = ""  # SFT data (UltraChat200k / SPIN / Alpaca / prompt-response rows; file or folder)
    output_dir: str = "runs/spin"
    tokenizer: str | None = None  # default: the model folder
    method: str = "spin"  # spin | sft | dpo | judge_spin | noise_spin | adaptive | sppo | register_method's
    num_iterations: int | None = None  # default: the schedule's length (a recipe's: more reuse its last entry)
    # per-iteration settings, one entry per iteration, e.g. [{"lr": 5e-7, "beta": 0.1}, {"lr": 1e-7}]; None:
    # the method's recipe (SPIN: the paper's schedule; dpo, noise_spin, sppo: theirs)
    iterations: list[dict[str, Any]] | None = None
    generate: bool = True  # False: no generation; train on the answers already in the data (SPIN rows'
    # generated answers, SPPO samples or precomputed probabilities), the same data every iteration
    mix_previous: bool = True  # from iteration 1, also train on the previous iteration's pairs
    template: str | None = None  # ONE prompt template for generation and training (None: chat template)
    max_prompt_length: int = 512  # prompts keep their last N tokens, in generation and training alike
    seed: int = 42  # training's data order; generation samples with seed + iteration
    split: str | None = None  # a folder of several splits: the one to read, e.g. "train_sft" (a file: all of it)
    data_format: str = "auto"
    limit: int | None = None  # use the first N rows (the paper samples 50k prompts)
    on_bad_row: str = "raise"  # "raise" or "skip" (skipped rows are listed in a warning)
    save_dtype: str = "auto"  # dtype of saved models: "auto" = the input config's torch_dtype, or float32...
    generation_dtype: str = "auto"  # "auto": the model's dtype on CUDA, float32 on CPU
    keep_train_state: bool = False  # keep <iter>/train_state/ (weights + optimizer) after the model is saved
    allow_config_change: bool = False  # resume even though the config differs from the run's config.json
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # judge_spin / adaptive / sppo scores

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if isinstance(self.judge, dict):
            self.judge = JudgeConfig(**self.judge)
        if self.on_bad_row not in ("raise", "skip"):
            raise ConfigError(f"on_bad_row must be 'raise' or 'skip', got {self.on_bad_row!r}")
        if self.iterations is not None and (not isinstance(self.iterations, list) or not self.iterations
                                            or not all(isinstance(d, dict) for d in self.iterations)):
            raise ConfigError("iterations must be a non-empty list of per-iteration setting objects, e.g. "
                              '[{"lr": 5e-7, "beta": 0.1}, {"lr": 1e-7}]')
        for name in ("save_dtype", "generation_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ConfigError(f"{name} must be one of {', '.join(_DTYPES)}, got {getattr(self, name)!r}")
        if self.num_iterations is not None and self.num_iterations < 1:
            raise ConfigError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.max_prompt_length < 1:
            raise ConfigError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.method in METHODS:  # (methods registered later are checked when the run starts)
            resolve(self)  # every iteration's settings now, with clear errors

    @property
    def total_iterations(self) -> int:
        return _schedule(self, given_names(self))[2]


@dataclass
class RunResult:
    """Where the run wrote its models: models[t] = theta_{t+1} (HF folder)."""
    run_dir: Path
    models: list[Path]

    @property
    def final_model(self) -> Path:
        return self.models[-1]


# ----------------------------------------------------------------------------- methods and pairs

def build_pairs(examples: Sequence[Example], config: RunConfig) -> list[Pair]:
    """The pair-builder seam: examples (with generated answers where the method generates) -> pairs."""
    return get_method(config.method).build_pairs(examples, config)


# ----------------------------------------------------------------------------- per-iteration settings

class Iteration(NamedTuple):
    """One iteration's effective settings (`resolve`)."""
    train: TrainConfig
    generation: GenerationConfig
    run: dict[str, Any]  # the run settings an iteration may set: {"mix_previous": ...}
    changed: dict[str, tuple[Any, Any]]  # {setting: (value, the recipe's value)} where they differ (status line)


def _per_iteration_names() -> dict[str, str]:
    """{a key an `iterations` entry may use: the setting it sets}: "lr" / "train.lr" -> "train.lr",
    "generation.top_p", "mix_previous"; not the run-level settings (template, max_prompt_length, seed)."""
    run_level = set(RunConfig.RUN_LEVEL)
    train = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in run_level | {"objective"}]
    generation = [f.name for f in dataclasses.fields(GenerationConfig) if f.name not in run_level]
    names = [f"train.{n}" for n in train] + [f"generation.{n}" for n in generation] + ["mix_previous"]
    return {**{name: name for name in names}, **{n: f"train.{n}" for n in train}}


_PER_ITERATION = _per_iteration_names()
_SETTINGS = list(dict.fromkeys(_PER_ITERATION.values()))  # the per-iteration settings, in field order


def resolve(config: RunConfig) -> list[Iteration]:
    """Every iteration's settings by minispin.config's rule (how many: `_schedule`). A per-iteration setting
    takes the value that wins among the schedule's entry for the iteration and the value given in train /
    generation / mix_previous (the higher level wins; two of the same level are refused); every other
    setting comes from those sections, and template / max_prompt_length / seed from the run."""
    given = given_names(config)
    _check_run_level(given)
    method = get_method(config.method)
    schedule, source, count = _schedule(config, given)
    recipe = schedule if source == RECIPE else _method_schedule(config.method)  # for the status line
    return [_iteration(config, method, given, t, _entry(schedule, t), source, _entry(recipe, t))
            for t in range(count)]


def _method_schedule(method_name: str) -> list[dict[str, Any]]:
    """The method's recipe: its own schedule, or SPIN's paper schedule."""
    method = METHODS.get(method_name)
    return method.schedule if method is not None and method.schedule is not None else PAPER_SCHEDULE


def _schedule(config: RunConfig, given: dict[str, str]) -> tuple[list[dict[str, Any]], str, int]:
    """The per-iteration settings in force, their source and the number of iterations. A given `iterations`
    list has one entry per iteration (a given num_iterations must agree); a recipe's schedule (the method's,
    or an example's) runs num_iterations iterations, by default its length."""
    if config.iterations is None:
        schedule, source = _method_schedule(config.method), RECIPE
    else:
        schedule, source = config.iterations, given.get("iterations", RECIPE)
    if source == RECIPE:
        return schedule, source, config.num_iterations or max(1, len(schedule))
    if "num_iterations" in given and config.num_iterations not in (None, len(schedule)):
        raise ConfigError(f"num_iterations is {config.num_iterations} but iterations lists {len(schedule)}: give "
                          "one iterations entry per iteration, or leave out num_iterations")
    return schedule, source, len(schedule)


def _entry(schedule: list[dict[str, Any]], t: int) -> dict[str, Any]:
    """Iteration t's entry of a schedule (past its end: the last entry)."""
    return schedule[min(t, len(schedule) - 1)] if schedule else {}


def _iteration(config: RunConfig, method: Method, given: dict[str, str], t: int, entry: dict[str, Any],
               source: str, recipe_entry: dict[str, Any]) -> Iteration:
    """Iteration t's configs: the winning per-iteration values over the sections, the run-level settings
    written in, the method's fixed loss checked; and what differs from the recipe alone."""
    values = _winning_values(config, given, t, entry, source)
    train_kw = {k[6:]: v for k, v in values.items() if k.startswith("train.")}
    gen_kw = {k[11:]: v for k, v in values.items() if k.startswith("generation.")}
    if method.loss is not None:
        if train_kw.get("loss", method.loss) != method.loss:
            raise ConfigError(f"iterations[{t}]: method {method.name!r} trains with loss {method.loss!r}, "
                              f"not {train_kw['loss']!r}")
        train_kw["loss"] = method.loss
    elif train_kw.get("loss", config.train.loss) == "sppo" and method.objective == "pairwise":
        raise ConfigError(f"iterations[{t}]: loss 'sppo' needs SPPO's targets; use --method sppo")
    shared = {"template": config.template, "max_prompt_length": config.max_prompt_length}
    try:
        train_cfg = dataclasses.replace(config.train, **train_kw, **shared, seed=config.seed,
                                        objective=method.objective)
        gen_cfg = dataclasses.replace(config.generation, **gen_kw, **shared,
                                      seed=config.seed + t)  # new samples every iteration
    except (TypeError, ValueError) as e:
        raise ConfigError(f"iteration {t}: {e}") from None
    run = {"mix_previous": values.get("mix_previous", config.mix_previous)}
    now = {name: lookup({"train": train_cfg, "generation": gen_cfg, **run}, name) for name in _SETTINGS}
    return Iteration(train_cfg, gen_cfg, run, _differences_from_recipe(config, method, given, now, recipe_entry))


def _differences_from_recipe(config: RunConfig, method: Method, given: dict[str, str], now: dict[str, Any],
                             recipe_entry: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (value, the recipe's value)} of an iteration's per-iteration settings (`now`) that differ
    from what the recipe alone gives: its entry's value, else the section's where nobody gave one, else
    the default."""
    recipe = {_PER_ITERATION[k]: v for k, v in recipe_entry.items()}
    if method.loss is not None:
        recipe["train.loss"] = method.loss
    changed = {}
    for name, value in now.items():
        if name in recipe:
            base = recipe[name]
        else:
            base = field_default(RunConfig, name) if name in given else lookup(config, name)
        if value != base:
            changed[name] = (value, base)
    return changed


def _winning_values(config: RunConfig, given: dict[str, str], t: int, entry: dict[str, Any],
                    source: str) -> dict[str, Any]:
    """{setting: value} of the per-iteration settings that iteration t's entry or a given option sets, each
    the winner by minispin.config's rule."""
    candidates: dict[str, list[tuple[str, Any, str]]] = {}
    for key, value in entry.items():
        if key not in _PER_ITERATION:
            raise ConfigError(f"iterations[{t}]: unknown per-iteration setting {key!r} (use a TrainConfig field "
                              "such as lr/beta/epochs/loss, train.<field>, generation.<field> or mix_previous; "
                              f"{'/'.join(RunConfig.RUN_LEVEL)} are settings of the whole run)")
        candidates.setdefault(_PER_ITERATION[key], []).append((f"iterations[{t}]", value, source))
    for name, src in given.items():
        if _PER_ITERATION.get(name) == name:
            candidates.setdefault(name, []).append((f"--{name}", lookup(config, name), src))
    return {name: winner(c, name)[0] for name, c in candidates.items()}  # type: ignore[index]


def _check_run_level(given: dict[str, str]) -> None:
    """The run-level settings live in RunConfig only: a value given in a section's copy is refused."""
    for dotted in RunConfig.SET_BY_RUN:
        if dotted in given:
            name = dotted.split(".")[1]
            raise ConfigError(f"{dotted} is set by the run: give {name} once (--{name}, RunConfig.{name}); "
                              "it serves generation and training alike")


def run_record(config: RunConfig, iterations: list[Iteration] | None = None) -> dict[str, Any]:
    """What <run>/config.json records: the settings as given and resolved ("settings"; the run-level
    ones once, at the top), the names given and where ("given"), and the EFFECTIVE train / generation /
    run settings of every iteration ("iterations"; `resolve(config)` unless passed)."""
    iterations = resolve(config) if iterations is None else iterations
    return {"settings": to_dict(config, leave_out=set(RunConfig.SET_BY_RUN).__contains__),
            "given": given_names(config),
            "iterations": [{"train": to_dict(it.train), "generation": to_dict(it.generation), **it.run}
                           for it in iterations]}


# ----------------------------------------------------------------------------- run directory

def _iter_dir(run: Path, t: int) -> Path:
    return run / f"iter{t}"


def _check_run_config(run: Path, config: RunConfig, current: dict[str, Any]) -> dict[str, Any] | None:
    """Rank 0: record the config of a new run (`current`: its run_record), or compare with the config the
    run started with. A config changed under --allow_config_change is returned (not written): the caller
    records it once the resumed work has passed its own checks, so a refused resume leaves config.json as
    it was."""
    path = run / "config.json"
    # what must match is the EFFECTIVE settings: where a value came from ("given") may differ (a run's own
    # config.json given back as --config resumes it); iterations compare over the ones both have (extending
    # a run adds iterations)
    free = resume_free_names(RunConfig)
    allowed = [f"settings.{k}" for k in free] + ["given", "iterations"]
    changed = check_manifest(path, current, allowed=allowed)
    recorded = read_manifest(path)
    if recorded is not None:
        per_iteration = [k for k in free if k.startswith(("train.", "generation."))]
        for t, (old, new) in enumerate(zip(recorded.get("iterations", []), current["iterations"])):
            changed |= {f"iterations[{t}].{k}": v for k, v in
                        changed_settings(old, new, allowed=per_iteration).items()}
    if changed:
        if _started(run) and not config.allow_config_change:
            raise ConfigError(f"{run} holds a run started with a different config ({describe_changes(changed, 8)}). "
                             "Use the same options to resume, another --output_dir, or --allow_config_change true")
        if _started(run):
            return current
        write_manifest(path, current)  # nothing done yet (e.g. the data was refused): take the new config
    return None


def _started(run: Path) -> bool:
    return any(run.glob("iter*"))


def _check_run_inputs(run: Path, config: RunConfig) -> None:
    """Rank 0: fingerprint the data files (size + digest) when the run starts; a resume over changed data
    is refused naming the files (a new run, or one refused before any work, records the new data)."""
    path = run / "inputs.json"
    current = fingerprint_inputs([config.data])
    recorded = read_manifest(path)
    if recorded is not None and _started(run):
        problems = changed_inputs(recorded.get("data", {}), current)
        if problems:
            raise RunError(f"{run} was started on other data: {'; '.join(problems[:5])}. Restore the data the "
                           "run started with, or start a new run with another --output_dir")
        return
    atomic_write_json(path, {"data": current})


def _write_state(run: Path, **state: Any) -> None:
    if dist.is_main():
        atomic_write_json(run / "state.json", state)


def _phase_done(it: Path, phase: str) -> bool:
    """Every rank: whether rank 0 finds `phase` of iteration folder `it` recorded done with matching
    files (`minispin.runs.phase_done`; damaged outputs raise RunError on every rank)."""
    done, error = False, None
    if dist.is_main():
        if phase == "model":
            recover_replaced_dir(it / "model")
        try:
            done = phase_done(it, phase)
        except RunError as e:
            error = str(e)
    done, error = dist.broadcast_json([done, error])
    if error:
        raise RunError(error)
    return done


def _record_phase(it: Path, phase: str, *outputs: Path) -> None:
    if dist.is_main():
        record_phase(it, phase, outputs)
    dist.barrier()


def _record_new_phase(it: Path, phase: str, output: Path) -> None:
    """Rank 0: record `phase` with its file when the file exists and the phase is not recorded yet."""
    if dist.is_main() and output.is_file() and phase not in (read_manifest(it / PHASES_NAME) or {}):
        record_phase(it, phase, [output])
    dist.barrier()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generation_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    if config.generation_dtype != "auto":
        return getattr(torch, config.generation_dtype)
    return None if device.type == "cuda" else torch.float32


def _read_generated(path: Path, config: RunConfig, source: str) -> list[Example]:
    # require_real=False: the input rows were checked when read; SPPO's prompts may have no answer
    rows = read_examples(path, format="spin", require_real=False, require_generated=False, warn=_log)
    return [dataclasses.replace(e, source=source) for e in rows]


_log = functools.partial(print0, prefix="run")  # the driver's status lines: "[run] ..." on rank 0


def _record_pair_stats(run: Path, t: int, method: str, stats: dict[str, Any]) -> None:
    """Rank 0: <iter>/pair_stats.json (atomic), then <run>/pair_stats.jsonl rebuilt from every iteration's
    file (one JSON line per iteration, so a resumed iteration never appears twice)."""
    if not dist.is_main():
        return
    atomic_write_json(_iter_dir(run, t) / "pair_stats.json", {"iteration": t, "method": method, "counts": stats})
    lines = []
    for path in sorted(run.glob("iter*/pair_stats.json"), key=lambda p: int(p.parent.name[4:] or 0)):
        lines.append(json.dumps(json.loads(path.read_text())))
    atomic_write_text(run / "pair_stats.jsonl", "".join(line + "\n" for line in lines))


# ----------------------------------------------------------------------------- the driver

@dataclass
class _Run:
    """One run in progress, on every rank: what its iterations share, and the models saved so far."""
    dir: Path
    config: RunConfig
    method: Method
    tokenizer: Any
    examples: list
    device: torch.device
    pending: dict[str, Any] | None  # a config changed under --allow_config_change, written once work starts
    models: list[Path] = field(default_factory=list)
    summaries: list[dict[str, Any] | None] = field(default_factory=list)

    @property
    def current(self) -> str | Path:
        """The model the next iteration starts from: the last one saved, else the run's input model."""
        return self.models[-1] if self.models else self.config.model

    def record_config(self) -> None:
        if self.pending is not None and dist.is_main():
            write_manifest(self.dir / "config.json", self.pending)
        self.pending = None

    def mark(self, t: int, phase: str) -> None:
        """Iteration t entered `phase`: the run's state.json says so (resume and status read it)."""
        _write_state(self.dir, iteration=t, phase=phase, model=str(self.current),
                     models=[str(m) for m in self.models])
        if phase == "train":  # the reference pass is complete and training passed its resume checks
            self.record_config()
            _record_new_phase(_iter_dir(self.dir, t), "reference", _iter_dir(self.dir, t) / "reference_logps.jsonl")

    def iteration(self, t: int, settings: Iteration) -> None:
        """Iteration t, or what is left of it: generate, pair, train, save; a finished one is read back."""
        it, config = _iter_dir(self.dir, t), self.config
        final = it / "model"
        if _phase_done(it, "model"):
            _log(f"iteration {t}: done earlier ({final})")
            _cleanup_train_state(it, config)
            self.models.append(final)
            self.summaries.append(_read_summary(it))
            return
        t0 = time.perf_counter()
        if dist.is_main():
            it.mkdir(parents=True, exist_ok=True)
        train_cfg = settings.train
        mark = functools.partial(self.mark, t)
        examples = _iteration_examples(self.dir, t, config, self.method, self.examples, self.current,
                                       self.tokenizer, settings.generation, self.device, mark)
        pairs = _iteration_pairs(self.dir, t, config, self.method, examples, settings.run)
        noise = "".join(f", {name} {value:g}" for name, value in (("label smoothing", train_cfg.label_smoothing),
                                                                    ("NEFTune alpha", train_cfg.neftune_alpha)) if value)
        _log(f"iteration {t}: {len(pairs)} pairs; lr {train_cfg.lr:g}, beta {train_cfg.beta:g}, "
             f"{train_cfg.epochs:g} epoch(s), loss {train_cfg.loss}{noise}{_not_from_recipe(settings.changed)}")

        _phase_done(it, "reference")  # a damaged reference file is refused, not trained on
        result = train(self.current, self.tokenizer, pairs, train_cfg, run_dir=it, on_phase=mark)
        truncation = result.truncation
        assert truncation is not None  # train() tokenized the pairs itself
        mark("save")
        saved = [final]
        if train_cfg.lora is not None:  # LoRA: the adapters in PEFT's layout, on the model they trained on
            saved.append(save_adapter(result.policy.model, it / "adapter", base_model=str(self.current)))
        save_trained_model(result.policy, final, tokenizer=self.tokenizer, dtype=_save_dtype(config))
        _record_phase(it, "model", *saved)
        del result
        _free_memory()
        _cleanup_train_state(it, config)
        dist.kill_point("save", iteration=t)
        self.models.append(final)
        _log(f"iteration {t}: saved {final}")
        self.summaries.append(_write_summary(it, t, self.method.name, len(pairs), time.perf_counter() - t0, final,
                                             truncation, train_cfg))


def spin(config: RunConfig) -> RunResult:
    """Run (or resume) a whole run of `config.method`; returns the saved models. Call on every rank under
    torchrun."""
    config = _check_inputs(config)
    method = get_method(config.method)
    schedule = resolve(config)  # every iteration's settings, once
    info = dist.init_distributed(config.train.device, single_process_group=torch.cuda.is_available()
                                 and (config.train.device or "cuda").startswith("cuda"))
    run_dir = Path(config.output_dir)
    lock = None
    try:
        lock = lock_run(run_dir)
        pending = _start_run(run_dir, config, run_record(config, schedule))
        tokenizer = load_tokenizer(config.tokenizer or config.model)
        check_tokenizer_fits(tokenizer, load_config(config.model).vocab_size, config.model)
        examples = _read_data(config, method)
        _log(f"{len(examples)} examples from {config.data}; method {method.name}; "
             f"{len(schedule)} iteration(s); world size {info.world_size}")
        run = _Run(run_dir, config, method, tokenizer, examples, info.device, pending)
        for t, settings in enumerate(schedule):
            run.iteration(t, settings)
        run.record_config()
        _write_state(run_dir, iteration=len(schedule), phase="done", models=[str(m) for m in run.models])
        _write_run_summary(run_dir, run.summaries)
        return RunResult(run_dir, run.models)
    finally:
        if lock is not None:
            lock.release()
        dist.shutdown(info)


# ----------------------------------------------------------------------------- summaries

_SUMMARY_COLUMNS = (("iter", "iteration", "{}"), ("pairs", "pairs", "{}"), ("steps", "steps", "{}"),
                    ("train s", "train_seconds", "{:.1f}"), ("loss", "loss", "{:.4f}"), ("margin", "margins", "{:.4f}"),
                    ("accuracy", "accuracies", "{:.3f}"), ("reward real", "rewards/real", "{:.4f}"),
                    ("reward gen", "rewards/generated", "{:.4f}"), ("cut", "pairs_truncated", "{}"))


def _write_summary(it: Path, t: int, method: str, n_pairs: int, wall_seconds: float, final: Path,
                   truncation: TruncationReport, train_cfg: TrainConfig) -> dict[str, Any]:
    """Rank 0: <iter>/summary.json (pairs, steps, time, last-10%-of-steps means of loss, margin, accuracy,
    rewards, truncation counts, where the model is) and its one-line version; returns it (every rank)."""
    records, _ = read_metrics(it / "metrics.jsonl") if dist.is_main() else ([], False)
    summary = {"iteration": t, "method": method, "pairs": n_pairs, **metrics_summary(records),
               "pairs_truncated": truncation.pairs_cut, "prompts_truncated": truncation.prompts_cut,
               "answers_truncated": truncation.answers_cut, "max_length": train_cfg.max_length,
               "max_prompt_length": train_cfg.max_prompt_length,
               "wall_seconds_this_call": round(wall_seconds, 1), "model": str(final)}
    if dist.is_main():
        atomic_write_json(it / "summary.json", summary)
    fmt = lambda key, spec: "?" if summary.get(key) is None else spec.format(summary[key])  # noqa: E731
    _log(f"iteration {t} summary: {n_pairs} pairs, {summary['steps']} steps, {wall_seconds:.0f}s; final loss "
         f"{fmt('loss', '{:.4f}')}" + ("" if summary["margins"] is None else
                                      f", margin {fmt('margins', '{:.4f}')}, accuracy {fmt('accuracies', '{:.3f}')}, "
                                      f"rewards real {fmt('rewards/real', '{:.4f}')} / generated "
                                      f"{fmt('rewards/generated', '{:.4f}')}") +
         f"; {truncation.pairs_cut} pairs truncated ({truncation.prompts_cut} prompts, {truncation.answers_cut} "
         f"answers); model {final}")
    return summary


def _read_summary(it: Path) -> dict[str, Any] | None:
    """An iteration's summary.json written earlier (None when absent, e.g. a run from an older version)."""
    path = it / "summary.json"
    if not dist.is_main() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _write_run_summary(run: Path, summaries: list[dict[str, Any] | None]) -> None:
    """Rank 0: <run>/summary.json (every iteration's summary) and a table of all iterations on stderr."""
    if not dist.is_main():
        return
    atomic_write_json(run / "summary.json", {"iterations": summaries})
    rows = [[("" if s is None or s.get(key) is None else spec.format(s[key])) if key != "iteration" else str(t)
             for _, key, spec in _SUMMARY_COLUMNS] for t, s in enumerate(summaries)]
    head = [name for name, _, _ in _SUMMARY_COLUMNS]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for cells in [head, ["-" * w for w in widths]] + rows:
        _log("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    _log(f"summary: {run / 'summary.json'}")


MODEL_FILES = "config.json, model.safetensors (or model.safetensors.index.json + shards) and tokenizer files"


def _check_model_folder(model: Path, config: RunConfig) -> None:
    """A Hugging Face model folder holds a config, weights and (unless --tokenizer) a tokenizer."""
    lacks = [name for name, ok in (
        ("config.json", (model / "config.json").is_file()),
        ("model.safetensors or model.safetensors.index.json (+ its shards)",
         (model / "model.safetensors").is_file() or (model / "model.safetensors.index.json").is_file()),
        ("tokenizer.json or tokenizer.model (or give --tokenizer)",
         config.tokenizer is not None or any((model / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))),
    ) if not ok]
    if lacks:
        raise UserError(f"--model {config.model} lacks {'; '.join(lacks)}")


def _check_inputs(config: RunConfig) -> RunConfig:
    """Before any work: the model folder, the data and the method's needs, each refused with one clear
    message naming the option that fixes it. Returns the config with the split resolved (a split only
    chooses inside a folder: an unasked one - e.g. an example's default - is dropped for a single file)."""
    if not config.model:
        raise ConfigError(f"--model is required: the starting model's Hugging Face folder ({MODEL_FILES}) "
                          "or llama.cpp .gguf file")
    model = Path(config.model)
    if is_gguf(model):
        if not model.is_file():
            raise UserError(f"--model {config.model}: no such GGUF file")
    elif not model.is_dir():
        raise UserError(f"--model {config.model}: no such folder (expected a Hugging Face model folder with "
                        f"{MODEL_FILES}, or a llama.cpp .gguf file)")
    else:
        _check_model_folder(model, config)
    if config.tokenizer is not None and not Path(config.tokenizer).exists():
        raise UserError(f"--tokenizer {config.tokenizer}: no such file or folder")
    if not config.data:
        raise ConfigError("--data is required: a .parquet/.jsonl/.json file of rows, or a folder of them "
                          "(e.g. UltraChat200k's train_sft-*.parquet)")
    data = Path(config.data)
    if not data.exists():
        raise UserError(f"--data {config.data}: no such file or folder (expected a .parquet/.jsonl/.json file, or a "
                        "folder of them such as UltraChat200k's train_sft-00000-of-00003.parquet)")
    if data.is_file() and config.split is not None and "split" not in given_names(config):
        config = replace_config(config, split=None)  # an example's default split: a file is read whole
    if data.is_dir() or data.suffix not in DATA_SUFFIXES or config.split is not None:
        try:
            data_files(data, config.split)
        except DataError as e:
            hint = "" if "--split" in e.reason or not data.is_dir() else (
                f" (expected files named like {config.split or 'train_sft'}-00000-of-00003.parquet or "
                f"{config.split or 'train_sft'}.jsonl; --split chooses the files by name)")
            raise DataError(f"--data {config.data}: {e.reason}{hint}") from None
    method = get_method(config.method)
    if method.needs_scorer and config.generate and not config.judge.configured:
        raise ConfigError(f"method {method.name!r} needs a judge for the generated answers: --judge.function "
                          "module:function (or file.py:function) or --judge.command 'cmd ...' (see "
                          "examples/judge_command.py); score columns in the data only serve --generate false")
    return config


def _start_run(run: Path, config: RunConfig, record: dict[str, Any]) -> dict[str, Any] | None:
    """Every rank, holding the run's lock: temp files of interrupted writes removed; the run's config.json
    (`record`) and data fingerprints are this run's (or the resume is refused and nothing is written).
    Returns a config changed under --allow_config_change, to be recorded once the work starts."""
    error, pending = None, None
    if dist.is_main():
        removed = remove_temp_files(run)
        if removed:
            _log(f"removed {len(removed)} temp file(s) of interrupted writes: "
                 f"{', '.join(str(p.relative_to(run)) for p in removed[:5])}{' ...' if len(removed) > 5 else ''}")
        try:
            pending = _check_run_config(run, config, record)
            _check_run_inputs(run, config)
        except UserError as e:
            error = [type(e).__name__, str(e)]
    error = dist.broadcast_json(error)
    if error:
        raise (RunError if error[0] == "RunError" else ConfigError)(error[1])
    return pending


def _read_data(config: RunConfig, method: Method) -> list:
    """The run's records, read the method's way (SFT / SPIN rows by default)."""
    warn = functools.partial(warn0, prefix="run")
    examples = method.read_data(config, warn) if method.read_data is not None else None
    if examples is None:
        examples = read_examples(config.data, format=config.data_format, split=config.split, limit=config.limit,
                                 on_error=config.on_bad_row, warn=warn,
                                 require_generated=method.needs_generation and not config.generate)
    if not examples:
        raise DataError("no usable rows (every row was empty or skipped); check the file and --data_format",
                        source=f"--data {config.data}")
    return examples


def _iteration_examples(run: Path, t: int, config: RunConfig, method: Method, examples: list, current: str | Path,
                        tokenizer: Any, gen_cfg: GenerationConfig, device: torch.device,
                        on_phase: Any) -> list:
    """Iteration t's records: the model's generated answers (resumable job -> <iter>/generated.jsonl) when
    the method generates, else the data's records."""
    if not (method.needs_generation and config.generate):
        return list(examples)
    it = _iter_dir(run, t)
    gen_path = it / "generated.jsonl"
    on_phase("generate")
    if not _phase_done(it, "generate"):
        if not dist.all_ranks_true(gen_path.is_file()):
            _log(f"iteration {t}: generating with {current}")
            gen_model = load_model(current, dtype=_generation_dtype(config, device), device=device)
            run_generation_job(gen_model, tokenizer, list(examples), gen_path, gen_cfg)
            del gen_model
            _free_memory()
        _record_phase(it, "generate", gen_path)
    return _read_generated(gen_path, config, f"iter{t}")


def _iteration_pairs(run: Path, t: int, config: RunConfig, method: Method, current_examples: list,
                     run_kw: dict[str, Any]) -> list[Pair]:
    """Iteration t's pairs: judge scores attached (cached), the method's pairs, the previous iteration's
    pairs mixed in (mix_previous), renumbered; the method's decision counts recorded and printed."""
    generates = method.needs_generation and config.generate
    it = _iter_dir(run, t)
    if method.prepare is not None:  # judge scores (cached per iteration, or per run without generation)
        current_examples = method.prepare(current_examples, config, (it if generates else run) / "judge_scores")
    pairs = build_pairs(current_examples, config)
    mix = run_kw.get("mix_previous", config.mix_previous)
    if mix and t > 0 and generates:
        prev = _iter_dir(run, t - 1) / "generated.jsonl"
        _phase_done(prev.parent, "generate")  # damaged: refused, naming the file
        if not prev.is_file():
            raise FileNotFoundError(f"iteration {t} mixes in the previous iteration's data, but {prev} "
                                    "is missing")
        prev_examples = _read_generated(prev, config, f"iter{t - 1}")
        if method.prepare is not None:
            prev_examples = method.prepare(prev_examples, config, _iter_dir(run, t - 1) / "judge_scores")
        pairs += build_pairs(prev_examples, config)
    pairs = [dataclasses.replace(p, index=i) for i, p in enumerate(pairs)]
    if method.summarize is not None:
        stats = method.summarize(pairs)
        _record_pair_stats(run, t, method.name, stats)
        _log(f"iteration {t}: {describe_counts(stats)}")
    return pairs


def _not_from_recipe(changed: dict[str, tuple[Any, Any]]) -> str:
    """"; not the recipe's: beta 0.1 (recipe 5), ..." for the status line ("" when all are the recipe's)."""
    shown = [f"{k.removeprefix('train.')} {_short(v)} (recipe {_short(r)})" for k, (v, r) in changed.items()]
    return f"; not the recipe's: {', '.join(shown)}" if shown else ""


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else json.dumps(value)


def _save_dtype(config: RunConfig):
    return "auto" if config.save_dtype == "auto" else getattr(torch, config.save_dtype)


def _cleanup_train_state(it: Path, config: RunConfig) -> None:
    if config.keep_train_state or not dist.is_main():
        return
    for name in ("train_state", "train_state.old"):
        if (it / name).exists():
            shutil.rmtree(it / name, ignore_errors=True)
