"""minispin: minimal, fast self-play fine-tuning (SPIN and relatives) for Llama/Mistral models."""
from setuptools import setup

setup(
    name="minispin",
    version="0.1.0",
    description="Minimal PyTorch library for self-play fine-tuning (SPIN, SPPO, DPO) of Llama/Mistral LLMs",
    python_requires=">=3.10",
    packages=["minispin", "minispin.training", "minispin.methods", "minispin.demo", "minispin.kernels"],
    # The Triton kernels live in the top-level kernels/ folder (no __init__.py: it must never import as a
    # top-level "kernels", Hugging Face's package of that name); the wheel puts them in minispin/kernels/,
    # the path that the module minispin/kernels.py gives its package.
    package_dir={"minispin": "minispin", "minispin.kernels": "kernels"},
    package_data={"minispin.demo": ["data/*.json", "data/*.md"]},  # the real-model demo's Alpaca rows
    install_requires=[
        "torch>=2.6",
        "triton>=3.2",
        "safetensors>=0.4",
        "sentencepiece>=0.1.99",
        "tokenizers>=0.15",
        "numpy>=1.24",
    ],
    extras_require={
        # jinja2 renders a tokenizer's chat template; pyarrow reads/writes parquet; transformers is only
        # a reference in tests.
        "chat": ["jinja2>=3.0"],
        # python -m minispin.demo: the pinned GGUF model, its chat template, the run figures
        "demo": ["jinja2>=3.0", "gguf>=0.19", "matplotlib>=3.7"],
        "parquet": ["pyarrow>=12"],
        # python -m minispin.report (figures); python -m minispin.eval (lm-evaluation-harness, hf models);
        # TrainConfig.tensorboard (a TensorBoard copy of the metrics)
        "plot": ["matplotlib>=3.7"],
        "eval": ["lm-eval[hf]>=0.4.13"],
        "tensorboard": ["tensorboard>=2.10"],
        # minispin.load_model / load_tokenizer / python -m minispin.convert on llama.cpp .gguf files
        "gguf": ["gguf>=0.19"],
        # accelerate: transformers' own GGUF loading, the tests' reference
        "test": ["pytest>=7", "pytest-xdist>=3", "jinja2>=3.0", "pyarrow>=12", "transformers>=4.40", "matplotlib>=3.7",
                 "lm-eval[hf]>=0.4.13", "tensorboard>=2.10", "protobuf>=3.20", "gguf>=0.19", "accelerate>=1.0"],
    },
)
