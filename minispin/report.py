"""Figures and a markdown report of a run, finished or still in progress.

    python -m minispin.report runs/spin              # -> runs/spin/report/{report.md, training.png, eval.png}
    python -m minispin.report runs/demo              # a folder of runs (the demo): one figure per run

Reads what the driver writes (nothing else is needed, nothing is changed): <run>/config.json,
<run>/state.json, <run>/iter<t>/metrics.jsonl (one JSON line per optimizer step; a torn last line of a
run in progress is skipped), <run>/pair_stats.jsonl, and the evaluation table <run>/eval_table.json
written by `python -m minispin.eval` or by the demo. Writes (atomically):
- training*.png: loss, rewards of the real vs the generated answers, margin, accuracy and log-probs over
  the steps of every iteration, one line per metric and iteration (faint: every step; solid: a moving
  average), iterations one after the other on one step axis;
- eval*.png: the evaluation table by iteration, one line per task and the Average, and the change from
  the SFT row (the seeds' "performance oscillation" picture);
- report.md: per-iteration summary, the evaluation table, links to the figures.
Needs matplotlib (`pip install minispin[plot]`).

TensorBoard: TrainConfig.tensorboard (`--tensorboard`) also copies the metrics to <iter>/tensorboard while
training (minispin.tensorboard); the JSON lines stay the source of truth.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import runs
from .eval import TABLE_JSON, EvalError, format_table, read_table
from .io import atomic_write_bytes, atomic_write_text

__all__ = ["IterationLog", "RunLog", "read_metrics", "read_run", "find_runs", "iteration_summary",
           "plot_training", "plot_eval", "Report", "write_report", "main"]

# (panel title, [(metrics.jsonl key, series name)]) in drawing order; a panel is drawn when a run has its keys
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", (("loss", ""),)),
    ("rewards (beta * log-ratio to the reference)", (("rewards/real", "real"), ("rewards/generated", "generated"))),
    ("margin (real - generated reward)", (("margins", ""),)),
    ("accuracy (real reward > generated)", (("accuracies", ""),)),
    ("summed log-prob of the answer", (("logps/real", "real"), ("logps/generated", "generated"))),
)
_STYLES = {"": "-", "real": "-", "generated": "--"}


class ReportError(ValueError):
    """A user-facing problem (not a run directory, a corrupt file, matplotlib missing): one line."""


# ----------------------------------------------------------------------------- reading a run

@dataclass
class IterationLog:
    """What one iteration left on disk so far."""
    index: int
    path: Path
    metrics: list[dict[str, Any]]
    model_saved: bool
    pair_stats: dict[str, Any] | None = None
    torn_line: bool = False  # the last line of metrics.jsonl was cut (a write in progress)


@dataclass
class RunLog:
    """A driver run directory: its config, state and iterations."""
    path: Path
    name: str  # for titles and file names ("" for the report's own run directory)
    config: dict[str, Any]
    state: dict[str, Any]
    iterations: list[IterationLog] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.config.get("settings", self.config).get("method", "?"))

    def status(self, it: IterationLog) -> str:
        if it.model_saved:
            return "done"
        if self.state.get("iteration") == it.index:
            return f"running ({self.state.get('phase', '?')})"
        return "not started"


def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], bool]:
    """runs.read_metrics, with its error as a ReportError."""
    try:
        return runs.read_metrics(path)
    except ValueError as e:
        raise ReportError(str(e)) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return value


def _is_run(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "state.json").is_file() or \
        any(p.name[4:].isdigit() and p.is_dir() for p in path.glob("iter*"))


def read_run(run_dir: str | os.PathLike, name: str = "") -> RunLog:
    """Read a run directory as it is now (any iteration may be unfinished)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"run directory {run} does not exist")
    stats: dict[int, dict[str, Any]] = {}
    pair_stats = run / "pair_stats.jsonl"
    if pair_stats.is_file():
        for n, line in enumerate(pair_stats.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    stats[int(row["iteration"])] = row.get("counts", {})
                except (ValueError, KeyError, TypeError) as e:
                    raise ReportError(f"{pair_stats}: line {n} is not a pair-stats record ({e})") from None
    log = RunLog(run, name, _read_json(run / "config.json"), _read_json(run / "state.json"))
    iters = sorted((p for p in run.glob("iter*") if p.is_dir() and p.name[4:].isdigit()),
                   key=lambda p: int(p.name[4:]))
    for it in iters:
        t = int(it.name[4:])
        metrics, torn = read_metrics(it / "metrics.jsonl")
        log.iterations.append(IterationLog(t, it, metrics, (it / "model" / "config.json").is_file(),
                                           stats.get(t), torn))
    return log


def find_runs(directory: str | os.PathLike) -> list[RunLog]:
    """The run in `directory`, or (a folder of runs, such as the demo's) the runs directly inside it."""
    root = Path(directory)
    if not root.is_dir():
        raise ReportError(f"run directory {root} does not exist")
    if _is_run(root):
        return [read_run(root)]
    runs = [read_run(p, p.name) for p in sorted(root.iterdir()) if p.is_dir() and _is_run(p)]
    if not runs:
        raise ReportError(f"{root} holds no minispin run (no config.json / state.json / iter<t>/ in it or "
                          "in its subfolders)")
    order = {"sft": 0, "continued_sft": 1}  # the demo's stages in pipeline order, then by name
    return sorted(runs, key=lambda r: (order.get(r.name, 2), r.name))


def iteration_summary(run: RunLog, it: IterationLog) -> dict[str, Any]:
    """One iteration's numbers: steps, pairs seen, time, and the last-10%-of-steps means of the metrics."""
    return {"run": run.name, "iteration": it.index, "status": run.status(it), **runs.metrics_summary(it.metrics),
            "model": str(it.path / "model") if it.model_saved else None, "pair_stats": it.pair_stats,
            "torn_line": it.torn_line}


# ----------------------------------------------------------------------------- figures

def _matplotlib():
    try:
        import matplotlib  # noqa: F401  (optional dependency)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("matplotlib is not installed: pip install minispin[plot]") from None
    return Figure, FigureCanvasAgg


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over `window` points (fewer at the ends); no lag."""
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    half, n = window // 2, len(values)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half), min(n, i - half + window)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def plot_training(run: RunLog):
    """Training curves of every iteration on one step axis; one solid (moving-average) line per metric,
    series and iteration, labelled "iter<t>" or "iter<t> <series>", over a faint every-step line
    (labelled with a leading "_", so legends skip it). Returns a matplotlib Figure."""
    Figure, FigureCanvasAgg = _matplotlib()
    keys = {k for it in run.iterations for r in it.metrics for k in r}
    panels = [(title, [(k, s) for k, s in series if k in keys]) for title, series in PANELS]
    panels = [p for p in panels if p[1]] or [PANELS[0]]
    fig = Figure(figsize=(9, 1.9 * len(panels) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(run.iterations))]
    offset = 0
    bounds = []
    for it, color in zip(run.iterations, colors):
        m = it.metrics
        if not m:
            continue
        x = [offset + r["step"] for r in m]
        window = max(1, len(m) // 25)
        for ax, (title, series) in zip(axes, panels):
            for key, sname in series:
                pts = [(xi, r[key]) for xi, r in zip(x, m) if isinstance(r.get(key), (int, float))
                       and math.isfinite(r[key])]
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                label = f"iter{it.index}" + (f" {sname}" if sname else "")
                style = _STYLES.get(sname, "-")
                if window > 1:
                    ax.plot(xs, ys, style, color=color, alpha=0.25, linewidth=0.7, label=f"_{label} every step")
                    ys = _moving_average(ys, window)
                ax.plot(xs, ys, style, color=color, linewidth=1.6, label=label)
        bounds.append((offset, x[-1], it.index))
        offset = x[-1]
    for ax, (title, series) in zip(axes, panels):
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        for start, _, _ in bounds[1:]:
            ax.axvline(start, color="0.5", linewidth=0.8, linestyle=":")
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7, ncol=min(4, max(1, len(run.iterations) * len(series))), loc="best")
    axes[-1].set_xlabel("optimizer step (iterations one after the other)", fontsize=9)
    for start, end, t in bounds:
        axes[0].annotate(f"iter{t}", xy=((start + end) / 2, 1.0), xycoords=("data", "axes fraction"),
                         ha="center", va="bottom", fontsize=8, color="0.3")
    name = f" {run.name}" if run.name else ""
    fig.suptitle(f"training{name}: method {run.method}, {len(run.iterations)} iteration(s) "
                 "(solid: moving average over 1/25 of each iteration's steps; faint: every step)",
                 fontsize=9)
    return fig


def plot_eval(table: dict[str, Any], title: str = ""):
    """The evaluation table by row (SFT, iter0, ...): left, each task's score and the Average (bold; none
    when the table has no Average); right, the change from the first row (SFT), in the table's change unit
    (points for accuracies). Baseline rows (e.g. continued SFT) are drawn as dashed horizontal lines: of
    their Average, or of each column without one. Returns a matplotlib Figure."""
    Figure, FigureCanvasAgg = _matplotlib()
    cols = table["columns"]
    rows = [r for r in table["rows"] if not r.get("baseline")]
    baselines = [r for r in table["rows"] if r.get("baseline")]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_abs, ax_diff = fig.subplots(1, 2)
    x = list(range(len(rows)))
    first = rows[0] if rows else None
    series = [(c.get("label", c["key"]), [r["scores"].get(c["key"]) for r in rows],
               first["scores"].get(c["key"]) if first else None, dict(linewidth=1.2, marker="o", markersize=4),
               [(r.get("stderr") or {}).get(c["key"]) for r in rows]) for c in cols]
    if table.get("average") is not None:
        series.append(("Average", [r.get("average") for r in rows], first.get("average") if first else None,
                       dict(linewidth=2.6, marker="s", markersize=6, color="black"), [None] * len(rows)))
    change = table.get("change") or {"scale": 100.0, "unit": "points"}  # tables written before it was a key
    colors = {}
    for label, ys, y0, style, errs in series:
        pts = [(xi, y) for xi, y in zip(x, ys) if y is not None]
        line, = ax_abs.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
        band = [(xi, y, e) for xi, y, e in zip(x, ys, errs) if y is not None and isinstance(e, (int, float))]
        if band:  # lm-eval's standard error, +-1
            ax_abs.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                                color=line.get_color(), alpha=0.12, linewidth=0)
        diff = [(xi, change["scale"] * (y - y0)) for xi, y in pts if y0 is not None]
        ax_diff.plot([p[0] for p in diff], [p[1] for p in diff], label=label,
                     **dict(style, color=line.get_color()))
        colors[label] = line.get_color()
    for r in baselines:  # dashed lines: the Average's, or each column's in its colour
        if table.get("average") is not None:
            lines = [("Average", r.get("average"), first.get("average") if first else None, "0.4")]
        else:
            lines = [(c.get("label", c["key"]), r["scores"].get(c["key"]),
                      first["scores"].get(c["key"]) if first else None, colors[c.get("label", c["key"])])
                     for c in cols]
        for label, y, y0, color in lines:
            if y is None:
                continue
            ax_abs.axhline(y, color=color, linestyle="--", linewidth=1, label=f"{r['name']} ({label})")
            if y0 is not None:
                ax_diff.axhline(change["scale"] * (y - y0), color=color, linestyle="--", linewidth=1,
                                label=f"{r['name']} ({label})")
    for ax in (ax_abs, ax_diff):
        ax.set_xticks(x, [r["name"] for r in rows], fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    ax_diff.axhline(0.0, color="0.6", linewidth=0.8)
    bands = any((r.get("stderr") or {}) for r in rows)
    ax_abs.set_title("score" + (" (band: +-1 standard error)" if bands else ""), fontsize=9, loc="left")
    ax_diff.set_title(f"change from {first['name'] if first else 'the first row'} ({change['unit']})", fontsize=9,
                      loc="left")
    fig.legend(*ax_abs.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    fig.suptitle(f"evaluation{' ' + title if title else ''}: {table.get('source', '')}", fontsize=9)
    return fig


def _png_bytes(fig, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the report

@dataclass
class Report:
    """What write_report produced: the figures (by file name), the files written, the summaries."""
    out_dir: Path
    figures: dict[str, Any]
    files: list[Path]
    summaries: list[dict[str, Any]]
    tables: dict[str, dict[str, Any]]

    @property
    def markdown(self) -> Path:
        return self.out_dir / "report.md"


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def _counts_text(stats: dict[str, Any] | None) -> str:
    if not stats:
        return ""
    return ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, (int, float)))


def _summary_markdown(summaries: list[dict[str, Any]]) -> str:
    head = ["run", "iter", "status", "steps", "pairs seen", "train s", "loss", "margin", "accuracy",
            "reward real", "reward gen", "log p real", "tok/s", "pair decisions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for s in summaries:
        cells = [s["run"] or ".", str(s["iteration"]), s["status"] + (" (torn last line skipped)" if s["torn_line"] else ""),
                 str(s["last_step"]), str(s["pairs_seen"]), f"{s['train_seconds']:.0f}", _fmt(s["loss"]),
                 _fmt(s["margins"]), _fmt(s["accuracies"], 3), _fmt(s["rewards/real"]), _fmt(s["rewards/generated"]),
                 _fmt(s["logps/real"], 3), _fmt(s["tokens_per_s"], 0) if s["tokens_per_s"] is None
                 else f"{s['tokens_per_s']:.0f}", _counts_text(s["pair_stats"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(directory: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                 dpi: int = 110) -> Report:
    """Read the run (or folder of runs) in `directory` and write the figures and report.md into
    `out_dir` (default <directory>/report). Safe to call while the run is still training."""
    root = Path(directory)
    runs = find_runs(root)
    out = Path(out_dir) if out_dir is not None else root / "report"
    _matplotlib()  # fail early, before anything is written
    figures: dict[str, Any] = {}
    summaries: list[dict[str, Any]] = []
    tables: dict[str, dict[str, Any]] = {}
    for run in runs:
        figures[f"training{'_' + run.name if run.name else ''}.png"] = plot_training(run)
        summaries += [iteration_summary(run, it) for it in run.iterations]
    candidates = [("", root)] + [(r.name, r.path) for r in runs if r.name]
    for name, path in candidates:
        if (path / TABLE_JSON).is_file():
            try:
                tables[name] = read_table(path / TABLE_JSON)
            except EvalError as e:
                raise ReportError(str(e)) from None
            figures[f"eval{'_' + name if name else ''}.png"] = plot_eval(tables[name], name)
    files = []
    for fname, fig in figures.items():
        atomic_write_bytes(out / fname, _png_bytes(fig, dpi))
        files.append(out / fname)

    md = [f"# Run report: {root}", ""]
    for run in runs:
        state = run.state.get("phase", "?")
        where = f" (iteration {run.state['iteration']})" if "iteration" in run.state and state != "done" else ""
        md.append(f"- {run.name or '.'}: method {run.method}, {len(run.iterations)} iteration folder(s), "
                  f"phase: {state}{where}")
    md += ["", "## Iterations", "",
           "Loss, margin, accuracy, rewards and log-probs: means over the last 10% of each iteration's steps; "
           "steps: the last step logged.", "", _summary_markdown(summaries)]
    for run in runs:
        fname = f"training{'_' + run.name if run.name else ''}.png"
        md += [f"![training{' ' + run.name if run.name else ''}]({fname})", ""]
    md += ["## Evaluation", ""]
    if not tables:
        md += [f"No {TABLE_JSON} yet: run `python -m minispin.eval {root}` (lm-evaluation-harness).", ""]
    for name, table in tables.items():
        where = f"{name}/" if name else ""
        average = f"; Average: {table['average']}" if table.get("average") else ""
        md += [f"From `{where}{TABLE_JSON}` ({table.get('source', '')}{average}).",
               "", format_table(table), f"![evaluation{' ' + name if name else ''}](eval{'_' + name if name else ''}.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    files.append(out / "report.md")
    return Report(out, figures, files, summaries, tables)


# ----------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minispin.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory, or a folder of runs (e.g. the demo's --out)")
    p.add_argument("--out", default=None, help="where to write the figures and report.md (default RUN_DIR/report)")
    p.add_argument("--dpi", type=int, default=110)
    args = p.parse_args(argv)
    try:
        report = write_report(args.run_dir, args.out, dpi=args.dpi)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in report.files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
