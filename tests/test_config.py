"""The one precedence rule (minispin.config): recipe < --config file < given, tracked as the set of names
given (never by comparing with defaults), and what a run records. Device-free: no model runs here."""
from __future__ import annotations

import dataclasses
import json

import pytest

import minispin
from minispin.cli import parse_args, parse_config
from minispin.config import FILE, GIVEN, ConfigError, given, given_names, replace
from minispin.driver import RunConfig, resolve, run_record
from minispin.generation_job import GenerationConfig
from minispin.training import TrainConfig

PAPER_BETAS = [0.1, 0.1, 0.1, 5.0]


def betas(cfg: RunConfig) -> list[float]:
    return [t.beta for t, *_ in resolve(cfg)]


def test_given_beta_equal_to_the_default_keeps_its_value_in_every_iteration():
    """beta=0.1 equals TrainConfig's default, yet it was given: 0.1 in all four iterations of the paper
    schedule (before: iteration 3 trained with 5.0); an ungiven beta follows the recipe."""
    assert betas(RunConfig(model="m", data="d", train=TrainConfig(beta=0.1))) == [0.1] * 4
    assert betas(RunConfig(model="m", data="d", train=TrainConfig(beta=0.2))) == [0.2] * 4
    assert betas(RunConfig(model="m", data="d", train=TrainConfig(lr=1e-6))) == PAPER_BETAS
    assert betas(RunConfig(model="m", data="d")) == PAPER_BETAS
    cfg = RunConfig(model="m", data="d")
    cfg.train.beta = 0.1  # assigned later: given too
    assert betas(cfg) == [0.1] * 4
    assert betas(parse_args(["--model", "m", "--data", "d", "--beta", "0.1"])) == [0.1] * 4  # on the command line


def test_given_names_are_recorded_by_init_and_assignment_not_by_value():
    t = TrainConfig("pairwise", beta=0.1)  # by position and by keyword
    assert given(t) == {"objective": GIVEN, "beta": GIVEN}
    assert given(TrainConfig()) == {}
    t.lr = 5e-7  # the default value, assigned: given
    assert set(given(t)) == {"objective", "beta", "lr"}
    assert set(given(replace(t, epochs=1))) == {"objective", "beta", "lr", "epochs"}
    assert set(given(dataclasses.replace(t, epochs=1))) >= {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = RunConfig(model="m", data="d", generation=GenerationConfig(top_p=0.9), iterations=[{"lr": 1e-6}])
    assert given_names(cfg) == {"model": GIVEN, "data": GIVEN, "iterations": GIVEN, "generation.top_p": GIVEN}


def test_config_file_beats_the_recipe_and_the_command_line_beats_the_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"model": "m", "data": "d", "train": {"beta": 0.2}, "limit": 20}))
    cfg = parse_args(["--config", str(path)])
    assert betas(cfg) == [0.2] * 4 and given_names(cfg)["train.beta"] == FILE  # file > recipe (5.0 at iter 3)
    cfg = parse_args(["--config", str(path), "--beta", "0.3"])
    assert betas(cfg) == [0.3] * 4 and given_names(cfg)["train.beta"] == GIVEN  # command line > file
    # an example's recipe gives defaults only: the file and the command line win over it
    recipe = {"limit": 10, "num_iterations": 2, "judge.tau": 4.0}
    cfg = parse_config(RunConfig, ["--config", str(path)], recipe=recipe)
    assert (cfg.limit, cfg.num_iterations, cfg.judge.tau) == (20, 2, 4.0)
    assert "num_iterations" not in given_names(cfg) and "judge.tau" not in given_names(cfg)
    assert parse_config(RunConfig, ["--config", str(path), "--limit", "30"], recipe=recipe).limit == 30
    # per-iteration values: a file's iterations replace the recipe; a command-line option wins over them
    path.write_text(json.dumps({"model": "m", "data": "d", "iterations": [{"lr": 1e-3, "beta": 0.2}, {"lr": 1e-4}]}))
    cfg = parse_args(["--config", str(path), "--lr", "5e-5"])
    assert [(t.lr, t.beta) for t, *_ in resolve(cfg)] == [(5e-5, 0.2), (5e-5, 0.1)]
    # the same level twice is a contradiction, refused by name
    path.write_text(json.dumps({"model": "m", "data": "d", "iterations": [{"lr": 1e-3}], "train": {"lr": 1e-4}}))
    with pytest.raises(ConfigError, match=r"train.lr is set both in iterations\[0\] and --train.lr \(config file\)"):
        parse_args(["--config", str(path)])


def test_a_given_schedule_sets_the_number_of_iterations(tmp_path):
    """A given `iterations` list has one entry per iteration: its length wins over a recipe's num_iterations
    (examples/spin_zephyr.py says 4); a given num_iterations that contradicts it is refused, not repeated;
    a recipe's schedule runs num_iterations iterations (past its end: its last entry)."""
    recipe = {"num_iterations": 4}
    argv = ["--model", "m", "--data", "d", "--iterations", '[{"lr": 1e-6, "beta": 0.2}]']
    one = parse_config(RunConfig, argv, recipe=recipe)
    assert [(t.lr, t.beta) for t, *_ in resolve(one)] == [(1e-6, 0.2)] and one.total_iterations == 1
    assert betas(parse_config(RunConfig, argv[:4], recipe=recipe)) == PAPER_BETAS
    assert betas(parse_config(RunConfig, argv[:4] + ["--num_iterations", "5"])) == PAPER_BETAS + [5.0]
    for bad in (["--num_iterations", "3"], ["--iterations", "[]"]):
        with pytest.raises(ConfigError, match=r"num_iterations is 3 but iterations lists 1: give one iterations "
                                              r"entry per iteration|iterations must be a non-empty list"):
            parse_config(RunConfig, argv + bad, recipe=recipe)
    path = tmp_path / "schedule.json"  # a --config file's list counts as given too
    path.write_text(json.dumps({"iterations": [{"lr": 1e-6}, {"lr": 1e-7}]}))
    assert len(resolve(parse_args(["--config", str(path), "--num_iterations", "2"]))) == 2
    with pytest.raises(ConfigError, match="num_iterations is 1 but iterations lists 2"):
        parse_args(["--config", str(path), "--num_iterations", "1"])
    with pytest.raises(ConfigError, match="num_iterations is 2 but iterations lists 1"):
        RunConfig(model="m", data="d", iterations=[{"lr": 1e-6}], num_iterations=2)


def test_a_runs_config_json_as_config_file_reproduces_its_settings(tmp_path):
    """config.json records settings, the names given and the EFFECTIVE per-iteration values; given back
    as --config it yields the same iterations, and command-line options still win."""
    cfg = RunConfig(model="m", data="d", train=TrainConfig(beta=0.1, micro_batch_size=4), num_iterations=4)
    record = run_record(cfg)
    assert set(record) == {"settings", "given", "iterations"}
    assert record["given"] == {"model": GIVEN, "data": GIVEN, "num_iterations": GIVEN, "train.beta": GIVEN,
                               "train.micro_batch_size": GIVEN}
    assert [(i["train"]["lr"], i["train"]["beta"], i["generation"]["seed"]) for i in record["iterations"]] == \
        [(5e-7, 0.1, 42), (5e-7, 0.1, 43), (1e-7, 0.1, 44), (1e-7, 0.1, 45)]
    assert "seed" not in record["settings"]["train"] and record["settings"]["seed"] == 42  # one home
    path = tmp_path / "config.json"
    path.write_text(json.dumps(record))
    again = parse_args(["--config", str(path)])
    assert run_record(again)["iterations"] == record["iterations"]
    assert set(given_names(again)) == set(record["given"])
    assert betas(parse_args(["--config", str(path), "--beta", "0.5"])) == [0.5] * 4


def test_status_line_differences_from_the_recipe():
    cfg = RunConfig(model="m", data="d", train=TrainConfig(beta=0.1, lr=1e-6))
    assert resolve(cfg)[0].changed == {"train.lr": (1e-6, 5e-7)}  # beta 0.1 is the recipe's there
    assert resolve(cfg)[3].changed == {"train.lr": (1e-6, 1e-7), "train.beta": (0.1, 5.0)}
    assert resolve(RunConfig(model="m", data="d"))[3].changed == {}
    noise = RunConfig(model="m", data="d", method="noise_spin", train=TrainConfig(neftune_alpha=0.0))
    assert resolve(noise)[0].changed == {"train.neftune_alpha": (0.0, 5.0)}


def test_run_level_settings_have_one_home():
    cfg = RunConfig(model="m", data="d", template="spin", max_prompt_length=100, seed=7)
    for t, (train_cfg, gen_cfg, *_) in enumerate(resolve(cfg)):
        assert (train_cfg.template, train_cfg.max_prompt_length, train_cfg.seed) == ("spin", 100, 7)
        assert (gen_cfg.template, gen_cfg.max_prompt_length, gen_cfg.seed) == ("spin", 100, 7 + t)
    for section, kw in (("train", {"seed": 1}), ("generation", {"max_prompt_length": 64}),
                        ("generation", {"template": "chat"}), ("train", {"objective": "sft"})):
        name = next(iter(kw))
        with pytest.raises(ConfigError, match=rf"{section}.{name} is set by the run"):
            RunConfig(model="m", data="d", **{section: {"train": TrainConfig, "generation": GenerationConfig}[
                section](**kw)})
    with pytest.raises(ConfigError, match="'seed'.*settings of the whole run"):
        RunConfig(model="m", data="d", iterations=[{"seed": 3}])
    with pytest.raises(ConfigError, match="max_prompt_length .512. must be < max_length .256."):
        RunConfig(model="m", data="d", train=TrainConfig(max_length=256))
    assert TrainConfig(max_length=256).max_prompt_length == 128  # standalone: half of max_length


def test_the_renamed_run_config_says_its_new_name():
    with pytest.raises(AttributeError, match=r"minispin.SpinConfig is now minispin.RunConfig"):
        minispin.SpinConfig  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        minispin.NoSuchThing  # noqa: B018
