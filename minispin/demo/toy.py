"""`python -m minispin.demo.toy`: the toy task demo (minispin.demo.run: a tiny Llama trained from scratch on a
checkable task), its plateau regime (minispin.demo.plateau) and either over several seeds (minispin.demo.seeds).

    python -m minispin.demo.toy                              # 2 torchrun ranks on CPU -> runs/demo
    python -m minispin.demo.toy --seeds 5                    # seeds 0..4 -> runs/demo_seeds/seed<s>, seeds.md
    python -m minispin.demo.toy --regime plateau             # from runs/demo's SFT model -> runs/demo/plateau
    python -m minispin.demo.toy --regime plateau --seeds 5   # -> runs/demo_seeds/seed<s>/plateau, plateau_seeds.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..log import run_main
from .plateau import PlateauConfig, plateau_stages
from .run import DemoConfig, add_common_options, demo_stages, launch_if_asked
from .seeds import run_seeds, with_seed

REGIMES = ("default", "plateau")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minispin.demo.toy", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", default=None, help="run folder (re-running with the same one continues; the plateau "
                   "regime shares the demo's SFT model in it); default runs/demo, with --seeds runs/demo_seeds")
    p.add_argument("--regime", choices=REGIMES, default="default",
                   help="default: short SFT, then continued SFT and SPIN; plateau: from the demo's SFT model, SFT "
                   "epochs on a fixed set until the validation accuracy stops rising, then continued SFT and SPIN "
                   "iterations 0-3 on the same prompts")
    p.add_argument("--iterations", type=int, default=None, help="SPIN iterations of the default regime (default 2)")
    add_common_options(p, "the model init, data order and sampling")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.iterations is not None and (args.iterations < 1 or args.regime == "plateau"):
        raise SystemExit("--iterations must be >= 1 and belongs to the default regime (the plateau regime runs "
                         "iterations 0-3 with the paper's schedule shape)")
    code = launch_if_asked("minispin.demo.toy", argv, args)
    if code is not None:
        return code
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    if args.regime == "plateau":
        config: Any = PlateauConfig.small(**overrides) if args.small else PlateauConfig(demo=DemoConfig(**overrides))
        run_one = plateau_stages
    else:
        config = DemoConfig.small(**overrides) if args.small else DemoConfig(**overrides)
        run_one = demo_stages
    out = Path(args.out or ("runs/demo_seeds" if args.seeds else "runs/demo"))

    def run() -> int:  # a user's mistake (a run folder made with other settings): one "error:" line
        info = dist.init_distributed(args.device)
        try:
            if args.seeds is None:
                run_one(out, config, args.device, info.world_size)
            else:
                plateau = args.regime == "plateau"
                run_seeds(out, [with_seed(config, args.seed + k) for k in range(args.seeds)], run_one,
                          args.device, info.world_size, results_in="plateau" if plateau else "",
                          name="plateau_seeds" if plateau else "seeds")
        finally:
            dist.shutdown(info)
        return 0
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
