"""minispin: minimal, fast self-play fine-tuning (SPIN, SPPO, DPO) for Llama/Mistral models.

    model = minispin.load_model("zephyr-7b-sft-full", dtype=torch.bfloat16, device="cuda")
    tok = minispin.load_tokenizer("zephyr-7b-sft-full")
    texts = minispin.generate(model, tok, ["Hi!"], max_new_tokens=64, temperature=0.7, seed=0)
    minispin.spin(minispin.RunConfig(model="zephyr-7b-sft-full", data="ultrachat_200k", split="train_sft"))

Note: `minispin.generate`, `minispin.train` and `minispin.spin` are the functions; their modules are
reached with `from minispin.sampler import ...` (or importlib).
"""
from .checkpoint import load_model, save_model
from .data import read_examples, read_preferences
from .model import KVCache, ModelConfig, Transformer
from .tokenizer import Tokenizer, load_tokenizer
from .sampler import generate  # noqa: E402  (rebinds the submodule attribute to the function)
from .generation_job import GenerationConfig, run_generation_job
from .training import TrainConfig, train
from .driver import RunConfig, spin

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "Transformer", "KVCache", "load_model", "save_model",
    "Tokenizer", "load_tokenizer", "read_examples", "read_preferences",
    "generate", "GenerationConfig", "run_generation_job",
    "TrainConfig", "train", "RunConfig", "spin",
]

_RENAMED = {"SpinConfig": "RunConfig"}  # public names that changed: {old: new}


def __getattr__(name: str):
    """A renamed public name fails with its new name, not a bare AttributeError."""
    if name in _RENAMED:
        raise AttributeError(f"minispin.{name} is now minispin.{_RENAMED[name]} (it configures every method's "
                             "run, not only SPIN's)")
    raise AttributeError(f"module 'minispin' has no attribute {name!r}")
