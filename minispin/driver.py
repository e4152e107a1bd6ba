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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import distributed as dist
from .checkpoint import load_config, load_model
from .cli import parse_config, to_dict
from .collate import Pair
from .data import Example, read_examples
from .generation_job import GenerationConfig, run_generation_job
from .io import atomic_write_json, atomic_write_text, recover_replaced_dir
from .log import print0, warn0
from .runs import (RunError, changed_inputs, check_manifest, describe_changes, fingerprint_inputs, lock_run,
                   phase_done, read_manifest, record_phase, PHASES_NAME, remove_temp_files, write_manifest)
from .methods import METHODS, PAPER_SCHEDULE, JudgeConfig, Method, describe_counts, get_method, register_method
from .tokenizer import check_tokenizer_fits, load_tokenizer
from .training import TrainConfig, save_trained_model, train

__all__ = ["SpinConfig", "SpinResult", "Pair", "Method", "METHODS", "register_method", "build_pairs", "spin",
           "PAPER_SCHEDULE", "iteration_configs", "pin_given_options", "parse_args", "main"]

_SPIN_LEVEL_OVERRIDES = ("mix_previous",)
# options a resumed run may change (num_iterations: a finished run may be extended by more iterations)
_IGNORED_ON_RESUME = ("output_dir", "allow_config_change", "num_iterations", "train.progress", "train.status_every",
                      "train.device", "generation.progress", "generation.batch_size", "generation.compile",
                      "generation.chunk_size", "generation.keep_parts", "train.save_steps",
                      "train.reference_batch_size", "keep_train_state", "judge.timeout_s",
                      "judge.prompts_per_call")


_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class SpinConfig:
    """A whole SPIN run. Defaults follow the paper (zephyr-7b-sft-full on UltraChat200k, 4 iterations)."""

    model: str = ""  # the starting (SFT) model: an HF safetensors folder
    data: str = ""  # SFT data (UltraChat200k / SPIN / Alpaca / prompt-response rows; file or folder)
    output_dir: str = "runs/spin"
    tokenizer: str | None = None  # default: the model folder
    method: str = "spin"  # spin | sft | dpo | judge_spin | noise_spin | adaptive | sppo | register_method's
    num_iterations: int | None = None  # default: len(iterations)
    # per-iteration overrides; left at this default (SPIN's paper schedule), methods with a recipe of their
    # own (dpo, noise_spin, sppo) use theirs, and values set in train / generation (e.g. --lr) win over it
    iterations: list[dict[str, Any]] = field(default_factory=lambda: [dict(d) for d in PAPER_SCHEDULE])
    generate: bool = True  # False: no generation; train on the answers already in the data (SPIN rows'
    # generated answers, SPPO samples or precomputed probabilities), the same data every iteration
    mix_previous: bool = True  # from iteration 1, also train on the previous iteration's pairs
    template: str | None = None  # ONE prompt template for generation and training (None: chat template)
    split: str | None = None  # e.g. "train_sft" for an UltraChat200k folder
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
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {self.on_bad_row!r}")
        if not isinstance(self.iterations, list) or not all(isinstance(d, dict) for d in self.iterations):
            raise ValueError("iterations must be a list of per-iteration override objects, e.g. "
                             '[{"lr": 5e-7, "beta": 0.1}, {"lr": 1e-7}]')
        for name in ("save_dtype", "generation_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {', '.join(_DTYPES)}, got {getattr(self, name)!r}")
        if self.num_iterations is not None and self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.method in METHODS:  # (methods registered later are checked when the run starts)
            iteration_configs(self)  # validate the overrides now, with clear errors

    @property
    def total_iterations(self) -> int:
        return self.num_iterations if self.num_iterations is not None else max(1, len(schedule_of(self)))


@dataclass
class SpinResult:
    """Where the run wrote its models: models[t] = theta_{t+1} (HF folder)."""
    run_dir: Path
    models: list[Path]

    @property
    def final_model(self) -> Path:
        return self.models[-1]


# ----------------------------------------------------------------------------- methods and pairs

def build_pairs(examples: Sequence[Example], config: SpinConfig) -> list[Pair]:
    """The pair-builder seam: examples (with generated answers where the method generates) -> pairs."""
    return get_method(config.method).build_pairs(examples, config)


def schedule_of(config: SpinConfig) -> list[dict[str, Any]]:
    """The per-iteration overrides: config.iterations, or the method's own schedule when iterations were
    left at the default (SPIN's paper schedule)."""
    method = METHODS.get(config.method)
    if method is not None and method.schedule is not None and config.iterations == PAPER_SCHEDULE:
        return method.schedule
    return config.iterations


def _default_schedule(method_name: str) -> list[dict[str, Any]]:
    method = METHODS.get(method_name)
    return method.schedule if method is not None and method.schedule is not None else PAPER_SCHEDULE


def _override_target(key: str) -> str | None:
    """An override key as the option it sets ("lr" -> "train.lr", "generation.top_p", "mix_previous"),
    or None when it names no option."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    gen_fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    if key.startswith("train.") and key[6:] in train_fields:
        return key
    if key.startswith("generation.") and key[11:] in gen_fields:
        return key
    if key in train_fields:
        return "train." + key
    if key in _SPIN_LEVEL_OVERRIDES:
        return key
    return None


def pin_given_options(data: dict[str, Any], on_command_line: set[str] | None = None) -> dict[str, Any]:
    """Command line: options given explicitly win over the per-iteration schedule's values.

    `data`: the nested dict of the options given (--config file and command line); `on_command_line`: the
    dotted names given on the command line (None: every train.* / generation.* / mix_previous in data).
    An option that the schedule also sets (e.g. --lr or --beta under SPIN's paper schedule,
    --generation.num_samples or --neftune_alpha under a method's own schedule, or anything a --config
    file's iterations set) is written into every entry of that schedule, which becomes `iterations`, so
    the run (and its config.json) uses the given value. An option given on the command line together
    with an --iterations that also sets it is refused as contradictory.
    """
    if on_command_line is None:
        on_command_line = {f"{section}.{k}" for section in ("train", "generation")
                           if isinstance(data.get(section), dict) for k in data[section]}
        on_command_line |= {k for k in _SPIN_LEVEL_OVERRIDES if k in data}
    given: dict[str, Any] = {}
    for dotted in on_command_line:
        section, _, name = dotted.rpartition(".")
        if section in ("train", "generation") and isinstance(data.get(section), dict) and name in data[section]:
            given[dotted] = data[section][name]
        elif not section and dotted in _SPIN_LEVEL_OVERRIDES and dotted in data:
            given[dotted] = data[dotted]
    if not given:
        return data
    if "iterations" in data:
        if not isinstance(data["iterations"], list) or not all(isinstance(e, dict) for e in data["iterations"]):
            return data  # SpinConfig refuses it with a clear message
        schedule = data["iterations"]
        both = sorted({t for e in schedule for t in map(_override_target, e) if t in given})
        if both and "iterations" in on_command_line:
            raise ValueError(f"{', '.join('--' + b for b in both)} given both as an option and in --iterations; "
                             "set it in one place (--iterations entries are per-iteration overrides)")
    else:
        schedule = _default_schedule(data.get("method", SpinConfig.method))
    pinned = sorted({t for e in schedule for t in map(_override_target, e) if t in given})
    if pinned:
        data = dict(data)
        data["iterations"] = [dict({k: v for k, v in e.items() if _override_target(k) not in pinned},
                                   **{t: given[t] for t in pinned}) for e in schedule]
    return data


def parse_args(argv: Sequence[str] | None = None, description: str | None = None,
               aliases: dict[str, str] | None = None) -> SpinConfig:
    """A SpinConfig from command-line options (see minispin.cli), with given options pinned over the
    default schedule (`pin_given_options`)."""
    return parse_config(SpinConfig, argv, description=description, prepare=pin_given_options, aliases=aliases)


def _explicit(section: Any, name: str) -> bool:
    """True when a TrainConfig / GenerationConfig field differs from its class default (set by the user)."""
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return getattr(section, name) != default


# ----------------------------------------------------------------------------- per-iteration configs

def iteration_configs(config: SpinConfig, iteration: int | None = None):
    """(TrainConfig, GenerationConfig, spin-level overrides) of one iteration (all when iteration is None).

    An override key is a TrainConfig field ("lr", "beta", "epochs", "loss", ...), "train.<field>",
    "generation.<field>", or "mix_previous". Iterations past the list reuse its last entry.
    """
    if iteration is None:
        return [iteration_configs(config, t) for t in range(config.total_iterations)]
    schedule = schedule_of(config) or [{}]
    overrides = schedule[min(iteration, len(schedule) - 1)]
    # iterations left at the default: values set in config.train / config.generation win over the
    # default schedule's (e.g. TrainConfig(lr=1e-6) under SPIN's paper schedule)
    default = config.iterations == PAPER_SCHEDULE
    train_kw, gen_kw, spin_kw = {}, {}, {}
    for key, value in overrides.items():
        target = _override_target(key)
        if target is None:
            raise ValueError(f"iterations[{iteration}]: unknown override {key!r} (use a TrainConfig field such "
                             "as lr/beta/epochs/loss, train.<field>, generation.<field> or mix_previous)")
        section, _, name = target.rpartition(".")
        if section == "train":
            if not (default and _explicit(config.train, name)):
                train_kw[name] = value
        elif section == "generation":
            if not (default and _explicit(config.generation, name)):
                gen_kw[name] = value
        else:
            spin_kw[target] = value
    method = get_method(config.method)
    template = _one_template(config)
    if config.generation.max_prompt_length != config.train.max_prompt_length:
        raise ValueError(f"generation.max_prompt_length ({config.generation.max_prompt_length}) differs from "
                         f"train.max_prompt_length ({config.train.max_prompt_length}); prompts must be cut the "
                         "same way in generation and training: set both to the same value (on the command "
                         "line --max_prompt_length sets both)")
    train_kw["template"] = template
    train_kw["method"] = method.train_method
    if method.loss is not None:
        wanted = train_kw.get("loss", config.train.loss if _explicit(config.train, "loss") else method.loss)
        if wanted != method.loss:
            raise ValueError(f"iterations[{iteration}]: method {method.name!r} trains with loss {method.loss!r}, "
                             f"not {wanted!r}")
        train_kw["loss"] = method.loss
    elif train_kw.get("loss", config.train.loss) == "sppo" and method.train_method == "spin":
        raise ValueError(f"iterations[{iteration}]: loss 'sppo' needs SPPO's targets; use --method sppo")
    train_cfg = dataclasses.replace(config.train, **train_kw)
    gen_kw.setdefault("seed", config.generation.seed + iteration)  # new samples every iteration
    gen_kw["template"] = template
    gen_kw.setdefault("max_prompt_length", train_cfg.max_prompt_length)
    gen_cfg = dataclasses.replace(config.generation, **gen_kw)
    if gen_cfg.max_prompt_length != train_cfg.max_prompt_length:
        raise ValueError(f"iterations[{iteration}]: generation and training max_prompt_length differ "
                         f"({gen_cfg.max_prompt_length} vs {train_cfg.max_prompt_length})")
    return train_cfg, gen_cfg, spin_kw


def _one_template(config: SpinConfig) -> str | None:
    """The prompt template shared by generation and training (SpinConfig.template wins; the nested
    train.template / generation.template may only repeat it)."""
    named = {k: v for k, v in (("template", config.template), ("train.template", config.train.template),
                               ("generation.template", config.generation.template)) if v is not None}
    if len(set(named.values())) > 1:
        raise ValueError(f"one prompt template must serve generation and training, got {named}; "
                         "set --template (sets all three)")
    return next(iter(named.values()), None)


# ----------------------------------------------------------------------------- run directory

def _iter_dir(run: Path, t: int) -> Path:
    return run / f"iter{t}"


def _check_run_config(run: Path, config: SpinConfig) -> dict[str, Any] | None:
    """Rank 0: record the config of a new run, or compare with the config the run started with. A config
    changed under --allow_config_change is returned (not written): the caller records it once the resumed
    work has passed its own checks, so a refused resume leaves config.json as it was."""
    path = run / "config.json"
    current = to_dict(config)
    changed = check_manifest(path, current, allowed=_IGNORED_ON_RESUME)
    if changed:
        if _started(run) and not config.allow_config_change:
            raise ValueError(f"{run} holds a run started with a different config ({describe_changes(changed, 8)}). "
                             "Use the same options to resume, another --output_dir, or --allow_config_change true")
        if _started(run):
            return current
        write_manifest(path, current)  # nothing done yet (e.g. the data was refused): take the new config
    return None


def _started(run: Path) -> bool:
    return any(run.glob("iter*"))


def _check_run_inputs(run: Path, config: SpinConfig) -> None:
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


def _generation_dtype(config: SpinConfig, device: torch.device) -> torch.dtype | None:
    if config.generation_dtype != "auto":
        return getattr(torch, config.generation_dtype)
    return None if device.type == "cuda" else torch.float32


def _read_generated(path: Path, config: SpinConfig, source: str) -> list[Example]:
    # require_real=False: the input rows were checked when read; SPPO's prompts may have no answer
    rows = read_examples(path, format="spin", require_real=False, require_generated=False, warn=_log)
    return [dataclasses.replace(e, source=source) for e in rows]


_log = functools.partial(print0, prefix="spin")  # the driver's status lines: "[spin] ..." on rank 0


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

def spin(config: SpinConfig) -> SpinResult:
    """Run (or resume) a whole SPIN run; returns the saved models. Call on every rank under torchrun."""
    _check_inputs(config)
    method = get_method(config.method)
    schedule = iteration_configs(config)
    info = dist.init_distributed(config.train.device, single_process_group=torch.cuda.is_available()
                                 and (config.train.device or "cuda").startswith("cuda"))
    run = Path(config.output_dir)
    lock = None
    try:
        lock = lock_run(run)
        pending = _start_run(run, config)

        def record_config() -> None:  # a config changed under --allow_config_change, once its work starts
            nonlocal pending
            if pending is not None and dist.is_main():
                write_manifest(run / "config.json", pending)
            pending = None

        tokenizer = load_tokenizer(config.tokenizer or config.model)
        check_tokenizer_fits(tokenizer, load_config(config.model).vocab_size, config.model)
        examples = _read_data(config, method)
        _log(f"{len(examples)} examples from {config.data}; method {method.name}; "
             f"{config.total_iterations} iteration(s); world size {info.world_size}")

        current: str | Path = config.model
        models: list[Path] = []
        for t, (train_cfg, gen_cfg, spin_kw) in enumerate(schedule):
            it = _iter_dir(run, t)
            final = it / "model"
            if _phase_done(it, "model"):
                _log(f"iteration {t}: done earlier ({final})")
                _cleanup_train_state(it, config)
                models.append(final)
                current = final
                continue
            if dist.is_main():
                it.mkdir(parents=True, exist_ok=True)

            def on_phase(phase: str, _t=t, _it=it) -> None:
                _write_state(run, iteration=_t, phase=phase, model=str(current), models=[str(m) for m in models])
                if phase == "train":  # the reference pass is complete and training passed its resume checks
                    record_config()
                    _record_new_phase(_it, "reference", _it / "reference_logps.jsonl")

            current_examples = _iteration_examples(run, t, config, method, examples, current, tokenizer, gen_cfg,
                                                   info.device, on_phase)
            pairs = _iteration_pairs(run, t, config, method, current_examples, spin_kw)
            noise = "".join(f", {name} {value:g}" for name, value in (("label smoothing", train_cfg.label_smoothing),
                                                                        ("NEFTune alpha", train_cfg.neftune_alpha)) if value)
            _log(f"iteration {t}: {len(pairs)} pairs; lr {train_cfg.lr:g}, beta {train_cfg.beta:g}, "
                 f"{train_cfg.epochs:g} epoch(s), loss {train_cfg.loss}{noise}")

            _phase_done(it, "reference")  # a damaged reference file is refused, not trained on
            result = train(current, tokenizer, pairs, train_cfg, run_dir=it, on_phase=on_phase)
            on_phase("save")
            save_trained_model(result.policy, final, tokenizer=tokenizer, dtype=_save_dtype(config))
            _record_phase(it, "model", final)
            del result
            _free_memory()
            _cleanup_train_state(it, config)
            dist.kill_point("save", iteration=t)
            models.append(final)
            current = final
            _log(f"iteration {t}: saved {final}")
        record_config()
        _write_state(run, iteration=len(schedule), phase="done", models=[str(m) for m in models])
        return SpinResult(run, models)
    finally:
        if lock is not None:
            lock.release()
        dist.shutdown(info)


def _check_inputs(config: SpinConfig) -> None:
    if not config.model:
        raise ValueError("SpinConfig.model is required: the starting model's HF folder")
    if not config.data:
        raise ValueError("SpinConfig.data is required: the SFT data file or folder")
    if not Path(config.model).exists():
        raise FileNotFoundError(f"model folder {config.model!r} does not exist")
    if not Path(config.data).exists():
        raise FileNotFoundError(f"data path {config.data!r} does not exist")
    if config.tokenizer and not Path(config.tokenizer).exists():
        raise FileNotFoundError(f"tokenizer folder {config.tokenizer!r} does not exist")


def _start_run(run: Path, config: SpinConfig) -> dict[str, Any] | None:
    """Every rank, holding the run's lock: temp files of interrupted writes removed; the run's config.json
    and data fingerprints are this run's (or the resume is refused and nothing is written). Returns a
    config changed under --allow_config_change, to be recorded once the work starts."""
    error, pending = None, None
    if dist.is_main():
        removed = remove_temp_files(run)
        if removed:
            _log(f"removed {len(removed)} temp file(s) of interrupted writes: "
                 f"{', '.join(str(p.relative_to(run)) for p in removed[:5])}{' ...' if len(removed) > 5 else ''}")
        try:
            pending = _check_run_config(run, config)
            _check_run_inputs(run, config)
        except ValueError as e:
            error = [type(e).__name__, str(e)]
    error = dist.broadcast_json(error)
    if error:
        raise (RunError if error[0] == "RunError" else ValueError)(error[1])
    return pending


def _read_data(config: SpinConfig, method: Method) -> list:
    """The run's records, read the method's way (SFT / SPIN rows by default)."""
    warn = functools.partial(warn0, prefix="spin")
    examples = method.read_data(config, warn) if method.read_data is not None else None
    if examples is None:
        examples = read_examples(config.data, format=config.data_format, split=config.split, limit=config.limit,
                                 on_error=config.on_bad_row, warn=warn,
                                 require_generated=method.needs_generation and not config.generate)
    if not examples:
        raise ValueError(f"{config.data}: no usable rows")
    return examples


def _iteration_examples(run: Path, t: int, config: SpinConfig, method: Method, examples: list, current: str | Path,
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


def _iteration_pairs(run: Path, t: int, config: SpinConfig, method: Method, current_examples: list,
                     spin_kw: dict[str, Any]) -> list[Pair]:
    """Iteration t's pairs: judge scores attached (cached), the method's pairs, the previous iteration's
    pairs mixed in (mix_previous), renumbered; the method's decision counts recorded and printed."""
    generates = method.needs_generation and config.generate
    it = _iter_dir(run, t)
    if method.prepare is not None:  # judge scores (cached per iteration, or per run without generation)
        current_examples = method.prepare(current_examples, config, (it if generates else run) / "judge_scores")
    pairs = build_pairs(current_examples, config)
    mix = spin_kw.get("mix_previous", config.mix_previous)
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


def _save_dtype(config: SpinConfig):
    return "auto" if config.save_dtype == "auto" else getattr(torch, config.save_dtype)


def _cleanup_train_state(it: Path, config: SpinConfig) -> None:
    if config.keep_train_state or not dist.is_main():
        return
    for name in ("train_state", "train_state.old"):
        if (it / name).exists():
            shutil.rmtree(it / name, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> SpinResult:
    """Command line: every SpinConfig field is an option (see minispin.cli)."""
    config = parse_args(argv, description=__doc__)
    result = spin(config)
    if dist.is_main():
        print(json.dumps({"run_dir": str(result.run_dir), "models": [str(m) for m in result.models]}))
    return result


if __name__ == "__main__":
    main()
