"""Hugging Face safetensors checkpoints: load into our `Transformer`, save loadable by transformers.

Loading builds the model on the meta device and takes each tensor as a view of its mapped bytes of the
file (copy-on-write: no second copy), shard by shard; a tensor converted to another dtype or moved to a
GPU gives its pages back once copied, so peak memory stays close to what the model holds. Saving
writes config.json (transformers 4.x layout) and safetensors shards with an index into a temporary
folder that is renamed into place: a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Collection, Iterator

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from . import distributed as dist
from . import gguf
from .errors import UserError
from .io import atomic_replace_dir, recover_replaced_dir, with_path
from .model import ModelConfig, Transformer, hf_key, our_key

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(UserError):
    """A checkpoint folder or file that does not match the model it should hold."""


def load_config(path: str | os.PathLike) -> ModelConfig:
    """Read `path/config.json` (or a GGUF file's metadata) into a ModelConfig (refusing architectures and
    features we do not run)."""
    if gguf.is_gguf(path):
        return gguf.read_config(path)
    recover_replaced_dir(path)  # a crash in the middle of a save leaves the old folder aside
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint folder {Path(path)} (expected {config_path})")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(hf, source=str(config_path))


def build_model(config: ModelConfig, device: torch.device | str = "meta") -> Transformer:
    """A Transformer whose parameters live on `device` (meta: no memory; fill with load_state_dict_into)."""
    with torch.device(device):
        model = Transformer(config)
    if str(device) != "meta":
        model.reset_buffers(device)
    return model


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header: {name: {dtype, shape, data_offsets}} and the byte offset of the data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[info["dtype"]]).element_size()
        if end - begin != numel * itemsize or data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} has inconsistent offsets (file truncated?)")
    return header, data_start


def _read_tensor(f, info: dict[str, Any], data_start: int, path: Path) -> torch.Tensor:
    """Read one tensor with plain file reads straight into a fresh CPU tensor (for data offsets that are not
    a multiple of the element size, which a view of the mapped file cannot have)."""
    t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    begin, end = info["data_offsets"]
    f.seek(data_start + begin)
    done = 0
    while done < end - begin:
        n = f.readinto(buf[done:])
        if not n:
            raise CheckpointError(f"{path}: unexpected end of file while reading a tensor")
        done += n
    return t


def _map_tensor(f, info: dict[str, Any], data_start: int) -> torch.Tensor:
    """One tensor as a view of its own copy-on-write mapping of the file's bytes (no copy; pages come in,
    with read-ahead, as they are used). The mapping lives exactly as long as some tensor uses its memory:
    a tensor converted to another dtype or moved to a GPU unmaps (gives back) its pages when dropped."""
    begin, end = (data_start + o for o in info["data_offsets"])
    first = begin // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(f.fileno(), end - first, offset=first, access=mmap.ACCESS_COPY)
    mapped.madvise(mmap.MADV_WILLNEED)  # start reading ahead now
    flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin - first)
    return flat.view(SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])


def iter_safetensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) from one safetensors file, in file order, one tensor's pages at a time
    unless the caller keeps them: each tensor maps its own bytes of the file (copy-on-write, as transformers
    does; writing to a tensor copies just the pages written, the file never changes). As with transformers,
    a file overwritten in place while its tensors are in use would show through (minispin's own saves
    replace folders atomically, never in place). Tensors whose data offset is not a multiple of their
    element size (no view can start there) are read into fresh memory."""
    path = Path(path)
    header, data_start = _read_header(path)
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[info["dtype"]]).element_size()
            if end == begin or (data_start + begin) % itemsize:
                yield name, _read_tensor(f, info, data_start, path)
            else:
                yield name, _map_tensor(f, info, data_start)


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, so that no more than one tensor need be in memory:
    the names, dtypes and shapes are fixed up front (they make the header), then `write` takes the tensors
    in that order. Readable by safetensors.load_file and by `iter_safetensors`."""

    def __init__(self, path: str | os.PathLike, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        codes = {dt: code for code, dt in SAFETENSORS_DTYPES.items()}
        header, offset = {}, 0
        self.order = []
        for name, dtype, shape in layout:
            numel = 1
            for d in shape:
                numel *= d
            size = numel * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append((name, dtype, tuple(shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self.order[self.next]
        assert (name, tensor.dtype, tuple(tensor.shape)) == (want, dtype, shape), (name, want)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self.next += 1

    def close(self) -> None:
        assert self.next == len(self.order), f"{self.next} of {len(self.order)} tensors written"
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder (via the index when sharded), checked to exist."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(f"{path} holds only pickle weights (.bin/.pt); minispin loads safetensors only "
                              "(convert them with transformers' save_pretrained(safe_serialization=True))")
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in checkpoint folder {path}")


def _checkpoint_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(Hugging Face key, CPU tensor, file name) of every tensor of a checkpoint folder or GGUF file."""
    if gguf.is_gguf(path):
        for key, tensor in gguf.iter_tensors(path):
            yield key, tensor, Path(path).name
        return
    for file in checkpoint_files(path):
        for key, tensor in iter_safetensors(file):
            yield key, tensor, file.name


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    old = module._parameters[leaf]
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def _local_piece(full: torch.Tensor, param: DTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's slice of `full`, the local tensor to copy it into) for a sharded (DTensor) parameter."""
    local = param.to_local()
    mesh = param.device_mesh
    piece = full
    for dim_mesh, placement in enumerate(param.placements):
        if placement.is_shard():
            n, r = mesh.size(dim_mesh), mesh.get_local_rank(dim_mesh)
            chunks = torch.chunk(piece, n, dim=placement.dim)  # FSDP2 shards like torch.chunk
            piece = chunks[r] if r < len(chunks) else piece.narrow(placement.dim, 0, 0)
    return piece, local


def copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter (in its dtype): all of it, or an FSDP2 shard's own slice."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            piece, local = _local_piece(full, param)
            local.copy_(piece.to(dtype=local.dtype))
        else:
            param.copy_(full.to(dtype=param.dtype))


def load_state_dict_into(model: Transformer, path: str | os.PathLike, dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None, skip: Collection[str] = ()) -> Transformer:
    """Stream a checkpoint folder's (or GGUF file's) tensors into `model`, checking names and shapes: the
    one loader for plain and sharded models. A meta or materialised model gets each tensor as its parameter (on
    `device`, in `dtype`); an FSDP2-sharded model (DTensor parameters, already on their device) copies
    only this rank's shard of every tensor into its local storage (no full copy per rank).
    skip: parameter names no checkpoint holds (fresh LoRA adapters, minispin.lora)."""
    # tied lm_head appears once, as embed_tokens.weight
    expected = {n: p for n, p in model.named_parameters() if n not in skip}
    tied = model.config.tie_word_embeddings
    sharded = any(isinstance(p, DTensor) for p in expected.values())
    device = torch.device(device) if device is not None else torch.device("cpu")
    loaded: set[str] = set()
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    for key, tensor, file in _checkpoint_tensors(path):
        name = our_key(key)
        if name is None or (tied and name == "lm_head.weight"):
            continue
        if name not in expected:
            unexpected.append(f"{key} ({file})")
            continue
        param = expected[name]
        if tuple(tensor.shape) != tuple(param.shape):
            wrong_shape.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}")
            continue
        if isinstance(param, DTensor):
            piece, local = _local_piece(tensor, param)
            if piece.shape != local.shape:
                wrong_shape.append(f"{key}: shard {tuple(piece.shape)} vs local {tuple(local.shape)}")
                continue
            with torch.no_grad():
                local.copy_(piece.to(dtype=local.dtype))
        else:
            _assign(model, name, tensor.to(device=device, dtype=dtype or param.dtype))
        loaded.add(name)
    missing = sorted(hf_key(n) for n in expected if n not in loaded)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"mis-shaped tensors: {'; '.join(wrong_shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model config: " + " | ".join(problems))
    if not sharded:  # a sharded model keeps its (FSDP-registered) parameters and buffers
        model.tie_weights()
        model.reset_buffers(device)
    return model


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Transformer:
    """Load a Hugging Face Llama/Mistral/Qwen2/Qwen3 safetensors folder (single file or sharded), or a llama.cpp
    GGUF file (dequantized, see minispin.gguf), into a Transformer.

    dtype None keeps the config's torch_dtype (float32 for a quantized GGUF); device None means CPU.
    """
    config = load_config(path)
    model = build_model(config, "meta")
    return load_state_dict_into(model, path, dtype=dtype or config.dtype, device=device).eval()


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '2GiB' -> 2 * 2**30, ints pass through."""
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_safetensors(tensors: dict[str, torch.Tensor], file: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with errors (e.g. disk full) that name the file being written."""
    try:
        save_file(tensors, str(file), metadata=metadata)
    except OSError as e:
        raise with_path(e, file) from e
    except Exception as e:  # safetensors' own error type, naming no file
        raise OSError(f"cannot write {file}: {e}") from e


def save_model(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = "5GB",
               state_dict: dict[str, torch.Tensor] | None = None,
               extra_files: list[str | os.PathLike] = (), extra_texts: dict[str, str] | None = None) -> Path:
    """Write an HF checkpoint folder atomically: config.json, safetensors shard(s) (+ index), extra files.

    `state_dict` (our parameter names) replaces model.state_dict(), e.g. a full state dict gathered from
    FSDP; `extra_files` (e.g. tokenizer files) are copied alongside so the folder is self-contained, and
    `extra_texts` ({file name: text}, e.g. the tokenizer files of a GGUF file) are written there.
    """
    path = Path(path)
    config: ModelConfig = model.config
    sd = state_dict if state_dict is not None else model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        tensors[hf_key(name)] = t.detach().to("cpu").contiguous()
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = t
        shard_bytes += nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        hf_config = config.to_hf()
        float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(float_dtypes) == 1:  # record the dtype the weights are saved in (e.g. bf16 from fp32 masters)
            hf_config["torch_dtype"] = str(float_dtypes.pop()).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if len(shards) == 1:
            save_safetensors(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update({key: name for key in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        for name, text in (extra_texts or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        dist.kill_point("stage_model")
        atomic_replace_dir(tmp, path)  # fsyncs, then renames into place
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:
            raise with_path(e, path) from e
        raise
    return path
