"""The SPIN iteration driver: generate -> pairs -> reference log-probs -> train -> save, T times.

    python -m minispin.spin --model zephyr-7b-sft-full --data ultrachat_200k --split train_sft \\
        --limit 50000 --output_dir runs/spin        # under torchrun the same command, every rank

For t = 0..T-1 (iteration t starts from theta_t: the input model for t = 0, else iteration t-1's result):
1. generate: theta_t answers every SFT prompt (`minispin.generation_job`, resumable, one row per prompt)
   -> <run>/iter<t>/generated.jsonl
2. pairs: `build_pairs(examples, config)` turns rows with generated answers into `Pair`s (SPIN: chosen =
   real answer, rejected = generated). From iteration 1 the previous iteration's pairs are added
   (`mix_previous`, as the paper does: 50k pairs at iteration 0, 100k after).
3. reference: summed log-probs of both answers of every pair under theta_t, once
   -> <run>/iter<t>/reference_logps.jsonl
4. train (`minispin.train.train`) -> <run>/iter<t>/metrics.jsonl, resumable <run>/iter<t>/train_state/
5. save theta_{t+1} as an HF safetensors folder (+ tokenizer files) -> <run>/iter<t>/model/

Resume: every phase's output is written atomically and marks the phase as done; generation and the
reference pass keep resumable part files; training keeps a checkpoint every `train.save_steps` steps.
After a kill -9 at any point the same command continues (on CPU it ends with the same weights as an
uninterrupted run). <run>/state.json says where the run is; <run>/config.json is the config it started
with (a resumed run with a different config is refused, naming the changed options).

Methods plug in at one seam: a `Method` names whether it needs generation, the loss family of
TrainConfig ("spin" pairwise / "sft"), and its pair builder `(examples, config) -> list[Pair]`.
Built in: "spin" (default) and "sft" (continued SFT on the real answers, the paper's baseline).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import distributed as du
from .collate import Pair
from .data import Example, read_examples
from .generation_job import GenerationConfig, run_generation_job
from .train import TrainConfig, save_trained_model, train

__all__ = ["SpinConfig", "SpinResult", "Pair", "Method", "METHODS", "register_method", "build_pairs", "spin",
           "PAPER_SCHEDULE", "iteration_configs", "main"]

# The paper's schedule (REFERENCE.md section 1): iterations 0-3 of zephyr-7b-sft-full.
PAPER_SCHEDULE: list[dict[str, Any]] = [
    {"lr": 5e-7, "beta": 0.1},
    {"lr": 5e-7, "beta": 0.1},
    {"lr": 1e-7, "beta": 0.1},
    {"lr": 1e-7, "beta": 5.0},
]
_SPIN_LEVEL_OVERRIDES = ("mix_previous",)
_IGNORED_ON_RESUME = ("output_dir", "allow_config_change", "train.progress", "train.status_every",
                      "train.device", "generation.progress", "generation.batch_size", "generation.compile",
                      "generation.chunk_size", "generation.keep_parts", "train.save_steps",
                      "train.reference_batch_size", "keep_train_state")


@dataclass
class SpinConfig:
    """A whole SPIN run. Defaults follow the paper (zephyr-7b-sft-full on UltraChat200k, 4 iterations)."""

    model: str = ""  # the starting (SFT) model: an HF safetensors folder
    data: str = ""  # SFT data (UltraChat200k / SPIN / Alpaca / prompt-response rows; file or folder)
    output_dir: str = "runs/spin"
    tokenizer: str | None = None  # default: the model folder
    method: str = "spin"  # "spin" | "sft" (continued SFT baseline) | methods added with register_method
    num_iterations: int | None = None  # default: len(iterations)
    iterations: list[dict[str, Any]] = field(default_factory=lambda: [dict(d) for d in PAPER_SCHEDULE])
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

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        if isinstance(self.generation, dict):
            self.generation = GenerationConfig(**self.generation)
        if self.on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {self.on_bad_row!r}")
        if not isinstance(self.iterations, list) or not all(isinstance(d, dict) for d in self.iterations):
            raise ValueError("iterations must be a list of per-iteration override objects, e.g. "
                             '[{"lr": 5e-7, "beta": 0.1}, {"lr": 1e-7}]')
        if self.num_iterations is not None and self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.method in METHODS:  # (methods registered later are checked when the run starts)
            iteration_configs(self)  # validate the overrides now, with clear errors

    @property
    def total_iterations(self) -> int:
        return self.num_iterations if self.num_iterations is not None else max(1, len(self.iterations))


@dataclass
class SpinResult:
    """Where the run wrote its models: models[t] = theta_{t+1} (HF folder)."""
    run_dir: Path
    models: list[Path]

    @property
    def final_model(self) -> Path:
        return self.models[-1]


# ----------------------------------------------------------------------------- methods and pairs

@dataclass(frozen=True)
class Method:
    """A training method: whether each iteration generates, the loss family, and the pair builder."""
    name: str
    needs_generation: bool
    train_method: str  # TrainConfig.method: "spin" (pairwise, any loss type) | "sft"
    build_pairs: Callable[[Sequence[Example], "SpinConfig"], list[Pair]]


def spin_pairs(examples: Sequence[Example], config: SpinConfig) -> list[Pair]:
    """SPIN: chosen = the real (human) answer, rejected = the model's generated answer."""
    pairs = []
    for e in examples:
        pairs.append(Pair(index=e.index, prompt=list(e.prompt), chosen=e.real,
                          rejected=e.generated if e.generated is not None else "",  # an empty sample is a sample
                          source=e.source))
    return pairs


def sft_pairs(examples: Sequence[Example], config: SpinConfig) -> list[Pair]:
    """Continued SFT: only the real answer."""
    return [Pair(index=e.index, prompt=list(e.prompt), chosen=e.real, rejected=None, source=e.source)
            for e in examples]


METHODS: dict[str, Method] = {
    "spin": Method("spin", needs_generation=True, train_method="spin", build_pairs=spin_pairs),
    "sft": Method("sft", needs_generation=False, train_method="sft", build_pairs=sft_pairs),
}


def register_method(method: Method) -> None:
    """Add a method (e.g. judge-relabelled SPIN, SPPO) without touching the loop."""
    METHODS[method.name] = method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def build_pairs(examples: Sequence[Example], config: SpinConfig) -> list[Pair]:
    """The pair-builder seam: examples (with generated answers where the method generates) -> pairs."""
    return get_method(config.method).build_pairs(examples, config)


# ----------------------------------------------------------------------------- per-iteration configs

def iteration_configs(config: SpinConfig, iteration: int | None = None):
    """(TrainConfig, GenerationConfig, spin-level overrides) of one iteration (all when iteration is None).

    An override key is a TrainConfig field ("lr", "beta", "epochs", "loss", ...), "train.<field>",
    "generation.<field>", or "mix_previous". Iterations past the list reuse its last entry.
    """
    if iteration is None:
        return [iteration_configs(config, t) for t in range(config.total_iterations)]
    schedule = config.iterations or [{}]
    overrides = schedule[min(iteration, len(schedule) - 1)]
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    gen_fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    train_kw, gen_kw, spin_kw = {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("train.") and key[6:] in train_fields:
            train_kw[key[6:]] = value
        elif key.startswith("generation.") and key[11:] in gen_fields:
            gen_kw[key[11:]] = value
        elif key in train_fields:
            train_kw[key] = value
        elif key in _SPIN_LEVEL_OVERRIDES:
            spin_kw[key] = value
        else:
            raise ValueError(f"iterations[{iteration}]: unknown override {key!r} (use a TrainConfig field such "
                             "as lr/beta/epochs/loss, train.<field>, generation.<field> or mix_previous)")
    method = get_method(config.method)
    template = _one_template(config)
    if config.generation.max_prompt_length != config.train.max_prompt_length:
        raise ValueError(f"generation.max_prompt_length ({config.generation.max_prompt_length}) differs from "
                         f"train.max_prompt_length ({config.train.max_prompt_length}); prompts must be cut the "
                         "same way in generation and training: set --max_prompt_length (sets both)")
    train_kw["template"] = template
    train_kw["method"] = method.train_method
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


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("train", "generation"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _check_run_config(run: Path, config: SpinConfig) -> None:
    """Rank 0: record the config of a new run, or compare with the config the run started with."""
    from .cli import to_dict
    from .io import atomic_write_json

    path = run / "config.json"
    current = to_dict(config)
    if path.is_file():
        old = json.loads(path.read_text())
        a, b = _flatten(old), _flatten(current)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in _IGNORED_ON_RESUME)
        if changed and not config.allow_config_change:
            detail = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:8])
            raise ValueError(f"{run} holds a run started with a different config ({detail}). Use the same "
                             "options to resume, another --output_dir, or --allow_config_change true")
        if not changed:
            return
    atomic_write_json(path, current)


def _write_state(run: Path, **state: Any) -> None:
    from .io import atomic_write_json
    if du.is_main():
        atomic_write_json(run / "state.json", state)


def _model_done(path: Path) -> bool:
    from .io import recover_replaced_dir
    recover_replaced_dir(path)
    return (path / "config.json").is_file()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generation_dtype(config: SpinConfig, device: torch.device) -> torch.dtype | None:
    if config.generation_dtype != "auto":
        return getattr(torch, config.generation_dtype)
    return None if device.type == "cuda" else torch.float32


def _read_generated(path: Path, config: SpinConfig, source: str) -> list[Example]:
    rows = read_examples(path, format="spin", require_generated=False)
    return [dataclasses.replace(e, source=source) for e in rows]


def _log(message: str) -> None:
    if du.is_main():
        print(f"[spin] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the driver

def spin(config: SpinConfig) -> SpinResult:
    """Run (or resume) a whole SPIN run; returns the saved models. Call on every rank under torchrun."""
    from .tokenizer import load_tokenizer

    if not config.model:
        raise ValueError("SpinConfig.model is required: the starting model's HF folder")
    if not config.data:
        raise ValueError("SpinConfig.data is required: the SFT data file or folder")
    if not Path(config.model).exists():
        raise FileNotFoundError(f"model folder {config.model!r} does not exist")
    if not Path(config.data).exists():
        raise FileNotFoundError(f"data path {config.data!r} does not exist")
    method = get_method(config.method)
    schedule = iteration_configs(config)
    info = du.init_distributed(config.train.device, single_process_group=torch.cuda.is_available()
                               and (config.train.device or "cuda").startswith("cuda"))
    run = Path(config.output_dir)
    try:
        if du.is_main():
            run.mkdir(parents=True, exist_ok=True)
        error = None
        if du.is_main():
            try:
                _check_run_config(run, config)
            except ValueError as e:
                error = str(e)
        error = du.broadcast_json(error)
        if error:
            raise ValueError(error)

        tokenizer = load_tokenizer(config.tokenizer or config.model)
        examples = read_examples(config.data, format=config.data_format, split=config.split, limit=config.limit,
                                 on_error=config.on_bad_row,
                                 warn=lambda m: _log(f"warning: {m}"))
        if not examples:
            raise ValueError(f"{config.data}: no usable rows")
        _log(f"{len(examples)} examples from {config.data}; method {method.name}; "
             f"{config.total_iterations} iteration(s); world size {info.world_size}")

        current: str | Path = config.model
        models: list[Path] = []
        for t, (train_cfg, gen_cfg, spin_kw) in enumerate(schedule):
            it = _iter_dir(run, t)
            final = it / "model"
            if du.all_ranks_true(_model_done(final)):
                _log(f"iteration {t}: done earlier ({final})")
                _cleanup_train_state(it, config)
                models.append(final)
                current = final
                continue
            if du.is_main():
                it.mkdir(parents=True, exist_ok=True)

            if method.needs_generation:
                gen_path = it / "generated.jsonl"
                _write_state(run, iteration=t, phase="generate", model=str(current), models=[str(m) for m in models])
                if not du.all_ranks_true(gen_path.is_file()):
                    _log(f"iteration {t}: generating with {current}")
                    from .checkpoint import load_model
                    gen_model = load_model(current, dtype=_generation_dtype(config, info.device), device=info.device)
                    run_generation_job(gen_model, tokenizer, list(examples), gen_path, gen_cfg)
                    del gen_model
                    _free_memory()
                current_examples = _read_generated(gen_path, config, f"iter{t}")
            else:
                current_examples = list(examples)

            pairs = build_pairs(current_examples, config)
            mix = spin_kw.get("mix_previous", config.mix_previous)
            if mix and t > 0 and method.needs_generation:
                prev = _iter_dir(run, t - 1) / "generated.jsonl"
                if not prev.is_file():
                    raise FileNotFoundError(f"iteration {t} mixes in the previous iteration's data, but {prev} "
                                            "is missing")
                pairs += build_pairs(_read_generated(prev, config, f"iter{t - 1}"), config)
            pairs = [dataclasses.replace(p, index=i) for i, p in enumerate(pairs)]
            _log(f"iteration {t}: {len(pairs)} pairs; lr {train_cfg.lr:g}, beta {train_cfg.beta:g}, "
                 f"{train_cfg.epochs:g} epoch(s), loss {train_cfg.loss}")

            def on_phase(phase: str, _t=t) -> None:
                _write_state(run, iteration=_t, phase=phase, model=str(current), models=[str(m) for m in models])

            result = train(current, tokenizer, pairs, train_cfg, run_dir=it, on_phase=on_phase)
            on_phase("save")
            save_trained_model(result.policy, final, tokenizer=tokenizer, dtype=_save_dtype(config))
            del result
            _free_memory()
            _cleanup_train_state(it, config)
            du.kill_point("save", iteration=t)
            models.append(final)
            current = final
            _log(f"iteration {t}: saved {final}")
        _write_state(run, iteration=len(schedule), phase="done", models=[str(m) for m in models])
        return SpinResult(run, models)
    finally:
        du.shutdown(info)


def _save_dtype(config: SpinConfig):
    return "auto" if config.save_dtype == "auto" else getattr(torch, config.save_dtype)


def _cleanup_train_state(it: Path, config: SpinConfig) -> None:
    if config.keep_train_state or not du.is_main():
        return
    for name in ("train_state", "train_state.old"):
        if (it / name).exists():
            shutil.rmtree(it / name, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> SpinResult:
    """Command line: every SpinConfig field is an option (see minispin.cli)."""
    from .cli import parse_config

    config = parse_config(SpinConfig, argv, description="Self-play fine-tuning (SPIN) of a Llama/Mistral model")
    result = spin(config)
    if du.is_main():
        print(json.dumps({"run_dir": str(result.run_dir), "models": [str(m) for m in result.models]}))
    return result


if __name__ == "__main__":
    main()
