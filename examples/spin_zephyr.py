"""The SPIN paper's recipe: zephyr-7b-sft-full on 50k UltraChat200k prompts, iterations 0-3.

    torchrun --nproc_per_node 8 examples/spin_zephyr.py \\
        --model /models/zephyr-7b-sft-full --data /data/ultrachat_200k --out runs/spin-zephyr
    python examples/spin_zephyr.py --demo [--small ...]   # = python -m minispin.demo (CPU, no downloads)

| iter | data                          | lr   | beta |
|------|-------------------------------|------|------|
| 0    | iter-0 synthetic (50k)        | 5e-7 | 0.1  |
| 1    | iter-0 + iter-1 (100k)        | 5e-7 | 0.1  |
| 2    | iter-1 + iter-2               | 1e-7 | 0.1  |
| 3    | iter-2 + iter-3               | 1e-7 | 5.0  |
RMSProp without weight decay, global batch 64, linear schedule with 10% warmup, 2 epochs per
iteration, max length 1024 / prompt 512, bf16 compute with fp32 master weights, generation of at
most 256 new tokens at temperature 1, ONE prompt template (the model's chat template) for generation
and training. Those are minispin's SpinConfig defaults; this script adds the 50k-prompt limit, the
train_sft split and the path checks. Every option of SpinConfig can be overridden (`--help`), e.g.
`--num_iterations 1`, `--train.micro_batch_size 4`, `--lr 1e-7` (every iteration; the betas stay the
paper's), `--iterations '[{"lr": 1e-6, "beta": 0.1}]'` (replaces the whole schedule).
Re-running the same command resumes the run.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from minispin.driver import parse_args, spin

# The recipe on top of SpinConfig's (paper) defaults; later command-line options override these.
RECIPE = ["--limit", "50000", "--split", "train_sft", "--num_iterations", "4", "--output_dir", "runs/spin-zephyr"]
ALIASES = {"--out": "--output_dir"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


def check_model_dir(model: str) -> None:
    """A Hugging Face model folder: config.json, safetensors weights, tokenizer files."""
    if not model:
        raise SystemExit("error: --model is required: the folder of zephyr-7b-sft-full (config.json, "
                         "model*.safetensors, tokenizer.json or tokenizer.model)")
    path = Path(model)
    if not path.is_dir():
        raise SystemExit(f"error: --model {model}: no such folder (expected the zephyr-7b-sft-full folder with "
                         "config.json, model*.safetensors and tokenizer files)")
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        problems.append("model.safetensors or model.safetensors.index.json (+ its shards)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        problems.append("tokenizer.json or tokenizer.model (+ tokenizer_config.json)")
    if problems:
        raise SystemExit(f"error: --model {model} lacks {'; '.join(problems)}")


def check_data(data: str, split: str | None) -> None:
    """UltraChat200k folder (train_sft*.parquet) or one parquet/jsonl/json file."""
    if not data:
        raise SystemExit("error: --data is required: the UltraChat200k folder (train_sft*.parquet) or a "
                         ".parquet/.jsonl/.json file of SFT rows")
    path = Path(data)
    if not path.exists():
        raise SystemExit(f"error: --data {data}: no such file or folder (expected the UltraChat200k folder with "
                         f"{split or 'train_sft'}*.parquet files, or a .parquet/.jsonl/.json file)")
    if path.is_dir():
        from minispin.data import DataError, data_files

        try:
            data_files(path, split)
        except DataError as e:
            raise SystemExit(f"error: --data {data}: {e} (expected files named like "
                             f"{split or 'train_sft'}-00000-of-00003.parquet or {split or 'train_sft'}.jsonl; "
                             "set --split to the split in the file names)") from None
    elif path.suffix not in DATA_SUFFIXES:
        raise SystemExit(f"error: --data {data}: unsupported file type (expected .parquet, .jsonl or .json)")


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--demo"]:
        from minispin.demo import run as demo

        return demo.main(argv[1:])
    description = __doc__ + "\nThis script runs: " + shlex.join(RECIPE) + " [your options, which win]"
    config = parse_args(RECIPE + argv, description=description, aliases=ALIASES)
    if Path(config.data).is_file() and not any(a.split("=")[0] == "--split" for a in argv):
        config.split = None  # one data file: take all of its rows
    check_model_dir(config.model)
    check_data(config.data, config.split)
    return spin(config)


if __name__ == "__main__":
    main()
