"""The seeds' evaluation table for every iteration of a run, with lm-evaluation-harness.

    python -m minispin.eval runs/spin                          # the seeds' task set (slow on a 7B model)
    python -m minispin.eval runs/spin --tasks arc_easy:25 gsm8k:5 --limit 100    # a quick look

Rows: "SFT" (the run's input model, config.json's `model`), then iter0 ... iterN (<run>/iter<t>/model, the
model each iteration trained; iterations still running are left out). Columns: one per task, then
Average (unweighted mean of the columns, as in the seeds' tables; empty until the row is complete).
Written as <run>/eval_table.json and <run>/eval_table.md; `python -m minispin.report` plots it.

Each (row, task) cell is kept in <run>/eval/<row>/<task>.json (atomic) with the settings that made it
(task, few-shot count, metric, --limit, lm-eval version, model fingerprint); a re-run computes only the
cells that are missing or were made with other settings. lm-eval runs offline (HF_HUB_OFFLINE,
HF_DATASETS_OFFLINE): the benchmarks' data sets must already be in the Hugging Face cache, or be local
tasks (--include_path, e.g. tests/fixtures/lm_eval_tasks). Needs `pip install minispin[eval]`.

The table format is shared with the built-in demo (`table_from_demo`), whose own exact-match
evaluation feeds the same table and plot.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .gguf import is_gguf
from .io import atomic_write_json, atomic_write_text
from .log import Progress, print0

__all__ = ["EvalTask", "SEED_TASKS", "TABLE_JSON", "TABLE_MD", "parse_task", "make_table", "write_table",
           "read_table", "format_table", "table_from_demo", "run_models", "evaluate_run", "main"]

TABLE_JSON = "eval_table.json"
TABLE_MD = "eval_table.md"


@dataclass(frozen=True)
class EvalTask:
    """One column: an lm-eval task (or group), its few-shot count and the metric read from its results
    (lm-eval's "metric,filter" key)."""
    name: str
    num_fewshot: int | None = None
    metric: str | None = None  # None: acc_norm, acc, exact_match or mc2, whichever the task reports first

    @property
    def label(self) -> str:
        return self.name if self.num_fewshot is None else f"{self.name}({self.num_fewshot})"


# The seed documents' table (SPIN paper appendix B, the internship report): few-shot counts and metrics
# of the Open LLM Leaderboard v1.
SEED_TASKS: tuple[EvalTask, ...] = (
    EvalTask("arc_challenge", 25, "acc_norm,none"),
    EvalTask("arc_easy", 25, "acc_norm,none"),
    EvalTask("truthfulqa_mc1", 0, "acc,none"),
    EvalTask("truthfulqa_mc2", 0, "acc,none"),
    EvalTask("winogrande", 5, "acc,none"),
    EvalTask("gsm8k", 5, "exact_match,strict-match"),
    EvalTask("hellaswag", 10, "acc_norm,none"),
    EvalTask("mmlu", 5, "acc,none"),
)
_METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "mc2", "f1")


class EvalError(ValueError):
    """A user-facing problem (bad option, missing model folder, missing package): printed as one line."""


def parse_task(spec: str) -> EvalTask:
    """`name`, `name:fewshot` or `name:fewshot:metric` (metric as lm-eval names it, e.g. acc_norm or
    exact_match,strict-match) -> EvalTask."""
    parts = spec.split(":", 2)
    if not parts[0]:
        raise EvalError(f"--tasks: empty task name in {spec!r} (use name, name:fewshot or name:fewshot:metric)")
    fewshot = None
    if len(parts) > 1 and parts[1] != "":
        try:
            fewshot = int(parts[1])
        except ValueError:
            raise EvalError(f"--tasks: the few-shot count in {spec!r} is not an integer "
                            "(use name, name:fewshot or name:fewshot:metric)") from None
        if fewshot < 0:
            raise EvalError(f"--tasks: negative few-shot count in {spec!r}")
    metric = parts[2] if len(parts) > 2 and parts[2] else None
    if metric is not None and "," not in metric:
        metric += ",none"
    return EvalTask(parts[0], fewshot, metric)


# ----------------------------------------------------------------------------- the table

def _average(scores: dict[str, float | None], columns: Sequence[str]) -> float | None:
    values = [scores.get(c) for c in columns]
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def make_table(columns: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], *, source: str,
               average: bool = True, change: tuple[float, str] = (100.0, "points"), **extra: Any) -> dict[str, Any]:
    """The table as JSON-ready dict. columns: [{"key", "label", ...}]; rows: [{"name", "scores": {key:
    value or None}, optional "model", "baseline" (True: a comparison row such as continued SFT, drawn
    as a reference line rather than as a point of the iteration axis)}]. Average is computed here, unless
    `average` is False (columns in different quantities, e.g. log-probs and their gap: no mean of them is
    meaningful). change: (scale, unit) of differences from the first row in the figure (accuracies: points)."""
    keys = [c["key"] for c in columns]
    assert len(set(keys)) == len(keys), f"duplicate columns {keys}"
    out_rows = []
    for r in rows:
        scores = {k: r["scores"].get(k) for k in keys}
        out_rows.append(dict(r, scores=scores, baseline=bool(r.get("baseline", False)),
                             average=_average(scores, keys) if average else None))
    return {"source": source, "columns": list(columns), "rows": out_rows,
            "average": "unweighted mean of the columns (empty until every column of the row is done)"
            if average else None, "change": {"scale": change[0], "unit": change[1]},
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def format_table(table: dict[str, Any], digits: int = 4) -> str:
    """The table in markdown, as the seeds print it (rows: models; columns: tasks, then Average)."""
    cols = table["columns"]
    average = table.get("average") is not None
    head = ["Task"] + [c.get("label", c["key"]) for c in cols] + ["Average"] * average
    fmt = lambda v: "" if v is None else f"{v:.{digits}f}"  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in table["rows"]:
        cells = [r["name"]] + [fmt(r["scores"].get(c["key"])) for c in cols] + [fmt(r.get("average"))] * average
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(directory: str | os.PathLike, table: dict[str, Any]) -> Path:
    """Write <directory>/eval_table.json and eval_table.md atomically; returns the JSON path."""
    directory = Path(directory)
    atomic_write_json(directory / TABLE_JSON, table)
    note = f"\nSource: {table['source']}." + (f" Average: {table['average']}." if table.get("average") else "")
    if table.get("limit") is not None:
        note += f" Only the first {table['limit']:g} examples of each task (--limit): a quick look, not the benchmark."
    note += "\n"
    atomic_write_text(directory / TABLE_MD, format_table(table) + note)
    return directory / TABLE_JSON


def read_table(path: str | os.PathLike) -> dict[str, Any]:
    """An eval_table.json (a directory means <directory>/eval_table.json), checked for the keys used."""
    path = Path(path)
    if path.is_dir():
        path = path / TABLE_JSON
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise EvalError(f"{path}: not valid JSON ({e}); rewrite it with python -m minispin.eval") from None
    for key in ("columns", "rows"):
        if not isinstance(table.get(key), list):
            raise EvalError(f"{path}: key {key!r} missing or not a list; rewrite it with python -m minispin.eval")
    for i, r in enumerate(table["rows"], 1):
        if not isinstance(r, dict) or "name" not in r or not isinstance(r.get("scores"), dict):
            raise EvalError(f"{path}: rows[{i}] (1-based) needs 'name' and 'scores'")
    return table


def table_from_demo(stages: Sequence[dict[str, Any]], skills: Sequence[str] | None = None) -> dict[str, Any]:
    """The demo's per-stage results (minispin.demo.run's evaluate_stage dicts, with "stage" and
    "exact_match_by_skill") as the seeds' table: rows SFT, continued SFT (a baseline), iter0 ... (from
    stages "<method>_iter<t>");
    columns the task's skills (exact match of greedy answers), in the order of `skills` if given."""
    skills = list(skills or [])
    for s in stages:
        skills += [k for k in s["exact_match_by_skill"] if k not in skills]
    skills = [k for k in skills if any(k in s["exact_match_by_skill"] for s in stages)]
    rows = []
    for s in stages:
        name = s["stage"]
        iteration = re.fullmatch(r"\w+_iter(\d+)", name)  # spin_iter0, or a methods demo's dpo_iter0 ...
        if iteration:
            name = f"iter{iteration.group(1)}"
        elif name == "sft":
            name = "SFT"
        elif name == "continued_sft":
            name = "continued SFT"
        rows.append({"name": name, "model": s.get("model"), "baseline": s["stage"] == "continued_sft",
                     "scores": dict(s["exact_match_by_skill"]), "exact_match_all": s.get("exact_match"),
                     "n_test": s.get("n_test")})
    names = [r["name"] for r in rows]
    assert len(set(names)) == len(names), f"one table row per stage name, got {names}"  # e.g. two methods' iter0
    columns = [{"key": k, "label": k, "metric": "exact match"} for k in skills]
    return make_table(columns, rows, source="minispin demo: exact match of greedy answers on held-out questions")


# ----------------------------------------------------------------------------- the models of a run

def run_models(run_dir: str | os.PathLike, sft_model: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """[(row name, model folder)]: ("SFT", the run's input model), then ("iter<t>", <run>/iter<t>/model)
    for every iteration whose model is saved (in order; a run in progress has fewer)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise EvalError(f"run directory {run} does not exist")
    if sft_model is None:
        config = run / "config.json"
        if not config.is_file():
            raise EvalError(f"{config} is missing: not a minispin run directory (or pass --sft_model)")
        recorded = json.loads(config.read_text(encoding="utf-8"))
        sft_model = recorded.get("settings", recorded).get("model")  # {"settings": ..., "given", "iterations"}
        if sft_model and is_gguf(sft_model):
            raise EvalError(f"{config}: the run's input model {sft_model} is a GGUF file; lm-eval reads Hugging "
                            f"Face folders: python -m minispin.convert {sft_model} DIR, then pass --sft_model DIR")
        if not sft_model or not (Path(sft_model) / "config.json").is_file():
            raise EvalError(f"{config}: key 'model' ({sft_model!r}) is not a model folder from here; pass "
                            "--sft_model PATH (the run's input model)")
    rows = [("SFT", Path(sft_model))]
    iters = sorted((p for p in run.glob("iter*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    for it in iters:
        if (it / "model" / "config.json").is_file():
            rows.append((it.name, it / "model"))
    return rows


def model_fingerprint(model_dir: Path) -> str:
    """A cheap content fingerprint of a model folder (no full read of a 7B checkpoint): sha256 of
    config.json, the weight files' names and sizes, and the last 64 KiB of each (weights, not header)."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            fh.seek(max(0, f.stat().st_size - 65536))
            h.update(fh.read(65536))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- lm-evaluation-harness

def _offline() -> None:
    """No hub or network access: set the offline switches (also in already-imported libraries)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants
        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as ds_config
        ds_config.HF_HUB_OFFLINE = True
        ds_config.HF_DATASETS_OFFLINE = True


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401  (optional dependency)
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalError(f"lm-evaluation-harness is not installed ({e}): pip install minispin[eval]") from None
    return lm_eval, simple_evaluate, HFLM, TaskManager


def pick_metric(task: EvalTask, results: dict[str, Any]) -> tuple[str, float, float | None]:
    """(metric key, value, stderr) of `task` from lm-eval's results["results"][task.name]."""
    metrics = results.get(task.name)
    if metrics is None:
        raise EvalError(f"task {task.name}: lm-eval returned no results for it (returned: {sorted(results)})")
    keys = [k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
    if task.metric is not None:
        if task.metric not in metrics:
            raise EvalError(f"task {task.name}: no metric {task.metric!r} in its results (it has: "
                            f"{', '.join(keys)}); name one with --tasks {task.name}:FEWSHOT:METRIC")
        key = task.metric
    else:
        ranked = [k for p in _METRIC_PREFERENCE for k in keys if k.split(",")[0] == p]
        if not ranked and not keys:
            raise EvalError(f"task {task.name}: no numeric metric in its results")
        key = (ranked or keys)[0]
    name, _, filt = key.partition(",")
    stderr = metrics.get(f"{name}_stderr,{filt}")
    return key, float(metrics[key]), float(stderr) if isinstance(stderr, (int, float)) else None


def _cell_settings(task: EvalTask, limit: float | None, model: Path, lm_eval_version: str) -> dict[str, Any]:
    return {"task": task.name, "num_fewshot": task.num_fewshot, "metric": task.metric, "limit": limit,
            "model": str(model), "model_fingerprint": model_fingerprint(model), "lm_eval": lm_eval_version}


def _cell_path(run: Path, row: str, task: EvalTask) -> Path:
    return run / "eval" / row / f"{task.name}.json"


def _read_cell(path: Path, settings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    """The cell's result when it was made with `settings`, else None (saying why when it exists)."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text(encoding="utf-8"))
        old = cell["settings"]
        float(cell["value"])
    except (ValueError, KeyError, TypeError):
        log(f"{path}: unreadable cell, computing it again")
        return None
    changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        log(f"{path}: made with other settings ({detail}), computing it again")
        return None
    return cell


def _task_manager(TaskManager: Any, tasks: Sequence[EvalTask], include_path: Sequence[str]) -> Any:
    """lm-eval's TaskManager that knows every task in `tasks` (or EvalError naming the unknown ones)."""
    # local tasks only: skip indexing lm-eval's thousands of built-in task files (a minute on a slow disk)
    task_manager = TaskManager(include_path=[str(p) for p in include_path], include_defaults=False) \
        if include_path else None
    if task_manager is None or not {t.name for t in tasks} <= set(task_manager.all_tasks):
        task_manager = TaskManager(include_path=[str(p) for p in include_path] or None)
    known = set(task_manager.all_tasks)
    unknown = [t.name for t in tasks if t.name not in known]
    if unknown:
        where = f"built in or in {', '.join(map(str, include_path))}" if include_path else \
            "built in; local tasks need --include_path DIR"
        raise EvalError(f"--tasks: no lm-eval task named {', '.join(unknown)} ({where})")
    return task_manager


def _compute_cell(simple_evaluate: Callable[..., Any], lm: Any, t: EvalTask, settings: dict[str, Any],
                  limit: float | None, task_manager: Any, row: str) -> dict[str, Any]:
    """One (row, task) cell: lm-eval's score of the loaded model on task t, with its settings and time."""
    start = time.perf_counter()
    try:
        out = simple_evaluate(model=lm, tasks=[t.name], num_fewshot=t.num_fewshot, limit=limit,
                              task_manager=task_manager, log_samples=False, verbosity="WARNING")
    except ConnectionError as e:  # datasets' "Couldn't reach ... on the Hub (OfflineModeIsEnabled)"
        raise EvalError(f"task {t.name}: its data set is not on this machine ({e}). minispin.eval runs "
                        "lm-eval offline (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1): fill the Hugging Face "
                        "datasets cache once where the hub is reachable (e.g. run lm-eval on the task "
                        "there) and use that cache here (HF_HOME / HF_DATASETS_CACHE)") from None
    key, value, stderr = pick_metric(t, out["results"])
    n = out.get("n-samples", {}).get(t.name, {})
    return {"row": row, "value": value, "stderr": stderr, "metric": key, "settings": settings,
            "n_samples": n.get("effective") if isinstance(n, dict) else None,
            "seconds": round(time.perf_counter() - start, 2)}


def evaluate_run(run_dir: str | os.PathLike, tasks: Sequence[EvalTask] = SEED_TASKS, *,
                 limit: float | None = None, include_path: Sequence[str] = (), sft_model: str | None = None,
                 batch_size: int | str = 8, device: str | None = None, dtype: str = "auto",
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate every saved model of the run on `tasks` (missing cells only) and write the table.

    Returns the table dict, with "computed": the (row, task) cells computed by this call."""
    log = log or functools.partial(print0, prefix="eval")
    if not tasks:
        raise EvalError("--tasks: no tasks given")
    if len({t.name for t in tasks}) != len(tasks):
        raise EvalError(f"--tasks: a task is named twice ({', '.join(t.name for t in tasks)})")
    run = Path(run_dir)
    models = run_models(run, sft_model)
    _offline()
    lm_eval, simple_evaluate, HFLM, TaskManager = _import_lm_eval()
    version = getattr(lm_eval, "__version__", "unknown")
    task_manager = _task_manager(TaskManager, tasks, include_path)
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"

    cells: dict[tuple[str, str], dict[str, Any]] = {}
    computed: list[tuple[str, str]] = []
    columns = [{"key": t.name, "label": t.label, "num_fewshot": t.num_fewshot, "metric": t.metric} for t in tasks]

    def table() -> dict[str, Any]:
        rows = [{"name": row, "model": str(path),
                 "scores": {t.name: cells[(row, t.name)]["value"] for t in tasks if (row, t.name) in cells},
                 "stderr": {t.name: cells[(row, t.name)].get("stderr") for t in tasks if (row, t.name) in cells}}
                for row, path in models]
        for c in columns:  # the metric actually read (the default pick, when none was named)
            picked = {cells[(r, c["key"])]["metric"] for r, _ in models if (r, c["key"]) in cells}
            if len(picked) == 1:
                c["metric"] = picked.pop()
        return make_table(columns, rows, source=f"lm-evaluation-harness {version}", limit=limit)

    todo_by_row = []
    for row, path in models:
        todo = []
        for t in tasks:
            settings = _cell_settings(t, limit, path, version)
            cell = _read_cell(_cell_path(run, row, t), settings, log)
            if cell is None:
                todo.append((t, settings))
            else:
                cells[(row, t.name)] = cell
        todo_by_row.append(todo)
    bar = Progress(len(models) * len(tasks), "eval", start=len(cells), unit="cells", every=1)
    for (row, path), todo in zip(models, todo_by_row):
        if not todo:
            log(f"{row}: every task done earlier")
            continue
        log(f"{row}: loading {path}")
        lm = HFLM(pretrained=str(path), device=device, batch_size=batch_size, dtype=dtype, trust_remote_code=False)
        for i, (t, settings) in enumerate(todo, 1):
            log(f"{row}: {t.label} ({i}/{len(todo)})" + (f", limit {limit:g}" if limit is not None else ""))
            cell = _compute_cell(simple_evaluate, lm, t, settings, limit, task_manager, row)
            atomic_write_json(_cell_path(run, row, t), cell)
            cells[(row, t.name)] = cell
            computed.append((row, t.name))
            write_table(run, table())
            log(f"{row}: {t.label} {cell['metric']} = {cell['value']:.4f} ({cell['seconds']:.0f}s)")
            bar.update(len(cells), f"{row} {t.label}")
        del lm
    bar.close()
    result = table()
    write_table(run, result)
    return dict(result, computed=computed)


# ----------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minispin.eval", description=__doc__.split("\n\n")[0],
                                epilog="default tasks: " + " ".join(f"{t.name}:{t.num_fewshot}" for t in SEED_TASKS))
    p.add_argument("run_dir", help="a minispin run directory (config.json, iter<t>/model)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="NAME[:FEWSHOT[:METRIC]]",
                   help="lm-eval tasks (default: the seeds' eight, with their few-shot counts)")
    p.add_argument("--limit", type=float, default=None,
                   help="evaluate only the first N examples of each task (a fraction if < 1): a quick look")
    p.add_argument("--include_path", action="append", default=[], help="a folder of local lm-eval task YAMLs")
    p.add_argument("--sft_model", default=None, help="the SFT row's model (default: config.json's model)")
    p.add_argument("--batch_size", default="8", help="lm-eval batch size (an integer or 'auto')")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="model dtype for lm-eval (default: the saved one)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tasks = [parse_task(s) for s in args.tasks] if args.tasks else list(SEED_TASKS)
        batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
        table = evaluate_run(args.run_dir, tasks, limit=args.limit, include_path=args.include_path,
                             sft_model=args.sft_model, batch_size=batch, device=args.device, dtype=args.dtype)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(table), end="")
    print(f"written: {Path(args.run_dir) / TABLE_JSON}, {Path(args.run_dir) / TABLE_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
