"""DPO on preference data: zephyr-7b-sft-full on UltraFeedback (binarized) preference pairs.

    torchrun --nproc_per_node 8 examples/dpo.py --model /models/zephyr-7b-sft-full \\
        --data /data/ultrafeedback_binarized --out runs/dpo
    python examples/dpo.py --demo            # the same method on the built-in demo task (CPU)

Data: rows with a prompt and chosen / rejected answers - TRL style `prompt` / `chosen` / `rejected`
(strings or message lists, e.g. HuggingFaceH4/ultrafeedback_binarized's train_prefs split) or sharegpt
style `conversations` / `chosen` / `rejected` (minispin.data.read_preferences). No generation: the
reference is the starting model, its log-probs computed once before training as in SPIN.
Recipe: one iteration, beta 0.1 (the DPO paper's), lr 5e-7, 1 epoch, RMSProp, global batch 64,
warmup 0.1 then linear decay (RunConfig's defaults otherwise).
"""
from __future__ import annotations

from minispin.cli import run_recipe
from minispin.demo import methods as demo_methods

# the method's schedule is the recipe (one iteration, lr 5e-7, beta 0.1, 1 epoch; --lr, --beta, --epochs, ...
# override it; --iterations '[{...}, ...]' for several). The split only applies to a folder of several
# splits (ultrafeedback_binarized's train_prefs); a single file is read whole.
RECIPE = {"method": "dpo", "split": "train_prefs", "output_dir": "runs/dpo"}


def demo(argv: list[str]):
    return demo_methods.main(["--methods", "dpo", "--out", "runs/demo_dpo", *argv])


if __name__ == "__main__":
    run_recipe(RECIPE, description=__doc__, demo=demo)
