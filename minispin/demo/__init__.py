"""The built-in demo: the whole SPIN pipeline on a small task with checkable answers, on CPU, with no
model or data to download. `task` (the task and its tokenizer), `run` (`python -m minispin.demo`: SFT,
continued SFT, SPIN, evaluated), `methods` (`python -m minispin.demo.methods`: every method compared).
The library core never imports this package."""
