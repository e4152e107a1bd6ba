"""minispin.demo.seeds (CPU): --seeds' mean and standard error, the per-seed paired comparison, and what a
seed changes (init weights, data order, sampling)."""
import math

import pytest
from safetensors.torch import load_file

from minispin.demo import run as demo_run
from minispin.demo import seeds as demo_seeds
from minispin.demo import task as demo_task
from minispin.demo.plateau import PlateauConfig
from demo_helpers import _stage


def _run(seed, values, above=(0.01, 0.05)):
    """A hand-made finished demo run: exact match per stage (SFT first) and per-stage bootstrap intervals."""
    labels = ["SFT", "continued SFT", "SPIN iter 0"]
    stages = [dict(_stage(n, lab, [1, 0]), exact_match=v, mean_logprob=-3.0 - v,
                   exact_match_by_skill={"reverse": v / 2, "sort": v, "add": 2 * v})
              for n, lab, v in zip(["sft", "continued_sft", "spin_iter0"], labels, values)]
    stats = [{"stage": "SFT"}] + [{"stage": lab, "vs_baseline": {"difference": v - values[0], "low": lo, "high": hi}}
                                  for lab, v, (lo, hi) in zip(labels[1:], values[1:], [above, (-0.05, -0.01)])]
    return {"config": {"seed": seed}, "stages": stages, "stats": stats, "seconds_this_run": 1.0}


def test_seeds_aggregation_mean_and_standard_error():
    runs = [_run(0, [0.30, 0.32, 0.25]), _run(1, [0.36, 0.35, 0.31]), _run(2, [0.33, 0.35, 0.37])]
    summary = demo_seeds.aggregate_seeds(runs)
    assert summary["seeds"] == [0, 1, 2]
    by = {s["stage"]: s for s in summary["stages"]}
    assert list(by) == ["sft", "continued_sft", "spin_iter0"]
    sft = by["sft"]["exact_match"]
    # mean 0.33; sample sd = sqrt(((-.03)^2 + .03^2 + 0) / 2) = 0.03; SE = 0.03 / sqrt(3)
    assert sft["mean"] == pytest.approx(0.33) and sft["se"] == pytest.approx(0.03 / math.sqrt(3))
    assert "vs_baseline" not in by["sft"]
    spin = by["spin_iter0"]
    diffs = [-0.05, -0.05, 0.04]  # per seed: SPIN - SFT of the same seed
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert spin["vs_baseline"]["mean"] == pytest.approx(mean) and spin["vs_baseline"]["se"] == pytest.approx(sd / math.sqrt(3))
    t975_df2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
    assert spin["vs_baseline"]["low"] == pytest.approx(mean - t975_df2 * sd / math.sqrt(3), rel=1e-6)
    assert spin["vs_baseline"]["high"] == pytest.approx(mean + t975_df2 * sd / math.sqrt(3), rel=1e-6)
    assert (spin["seeds_above"], spin["seeds_below"]) == (0, 3)
    assert (by["continued_sft"]["seeds_above"], by["continued_sft"]["seeds_below"]) == (3, 0)
    add = spin["exact_match_by_skill"]["add"]
    assert add["mean"] == pytest.approx(2 * (0.25 + 0.31 + 0.37) / 3)
    assert add["se"] == pytest.approx(2 * 0.06 / math.sqrt(3))
    assert by["sft"]["mean_logprob"]["mean"] == pytest.approx(-3.33)
    text = demo_seeds.format_seeds(summary)
    row = next(x for x in text.splitlines() if x.startswith("| SPIN iter 0 |"))
    assert f"| 0.310 ± {0.06 / math.sqrt(3):.3f} | {mean:+.3f} ± {sd / math.sqrt(3):.3f} |" in row
    assert "| 0 / 3 |" in row
    assert text.index("| reverse |") < text.index("| sort |") < text.index("| add |")  # the task's skill order
    # one seed: no standard error, no interval
    one = demo_seeds.aggregate_seeds(runs[:1])
    assert one["stages"][0]["exact_match"]["se"] is None and "low" not in one["stages"][2]["vs_baseline"]
    assert "± n/a" in demo_seeds.format_seeds(one)


def test_compare_stages_per_seed_paired_difference():
    """SPIN iter t minus continued SFT iter t per seed (the plateau summary): +1/4 in one seed, +3/4 in the other
    (there every resample of the 4 questions that keeps a flipped one is positive, none negative)."""
    def run(cont, spin):
        return {"stages": [_stage("continued_sft_iter0", "continued SFT iter 0", cont),
                           _stage("spin_iter0", "SPIN iter 0", spin)]}
    runs = [run([1, 1, 0, 0], [1, 1, 1, 0]), run([0, 0, 0, 1], [1, 1, 1, 1])]
    c = demo_seeds.compare_stages(runs, "continued_sft_iter0", "spin_iter0")
    assert c["values"] == [0.25, 0.75] and c["mean"] == pytest.approx(0.5)
    assert c["se"] == pytest.approx(math.sqrt(((0.25 - 0.5) ** 2 + (0.75 - 0.5) ** 2) / 1) / math.sqrt(2))
    t975_df1 = 12.706204736174705
    assert (c["low"], c["high"]) == pytest.approx((0.5 - t975_df1 * c["se"], 0.5 + t975_df1 * c["se"]), rel=1e-6)
    assert c["seeds_below"] == 0 and c["seeds_above"] <= 1


def test_seed_changes_model_init_sft_order_and_sampling(tmp_path):
    """--seeds: seed s changes the init weights, the training data order and the sampling seed."""
    a = demo_seeds.with_seed(demo_run.DemoConfig.small(), 3)
    b = demo_seeds.with_seed(PlateauConfig.small(), 4)
    assert a.seed == 3 and b.demo.seed == 4 and b.n_spin == PlateauConfig.small().n_spin
    assert demo_run.run_settings(a)["seed"] == 3  # one home: the run's seed drives init order, training and sampling
    tok = demo_task.write_tokenizer(tmp_path / "tok")
    w = [load_file(demo_run.init_model(tmp_path / f"init{s}", tok, demo_seeds.with_seed(a, s)) / "model.safetensors")
         for s in (0, 0, 1)]
    name = next(iter(w[0]))
    assert (w[0][name] == w[1][name]).all() and not (w[0][name] == w[2][name]).all()
