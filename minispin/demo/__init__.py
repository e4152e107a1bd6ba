"""The built-in demos. `chat` (`python -m minispin.demo`): SPIN on a real chat model, SmolLM2-135M-Instruct, with
real instruction data. The toy task with checkable answers and no download: `task` (the task and its
tokenizer), `run` + `toy` (`python -m minispin.demo.toy`: SFT from scratch, continued SFT, SPIN, evaluated;
`plateau`, `seeds`), `methods` (`python -m minispin.demo.methods`: every method compared).
The library core never imports this package."""
