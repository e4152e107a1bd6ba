"""Loading and saving Hugging Face safetensors checkpoints: round trips, transformers interop, clear errors."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minispin import load_model, save_model
from minispin.checkpoint import CheckpointError, iter_safetensors, parse_size
from minispin.errors import UserError
from minispin.model import SUPPORTED_ARCHITECTURES
from tiny import FIXTURES


def tensors_of(folder):
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        if f.name != "expected_logits.safetensors":
            out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", ["hf-tiny-llama", "hf-tiny-mistral", "hf-tiny-qwen2", "hf-tiny-qwen3"])
def test_load_save_load_is_bit_identical(tmp_path, name):
    model = load_model(FIXTURES / name)
    save_model(model, tmp_path / "a", max_shard_size="100KB")
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    again = load_model(tmp_path / "a")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and p1.dtype == p2.dtype and torch.equal(p1, p2)
    original = tensors_of(FIXTURES / name)
    saved = tensors_of(tmp_path / "a")
    assert original.keys() == saved.keys()
    assert all(torch.equal(original[k], saved[k]) for k in original)


def test_single_file_save_and_bf16(tmp_path):
    model = load_model(FIXTURES / "hf-tiny-llama", dtype=torch.bfloat16)
    save_model(model, tmp_path / "b")
    assert (tmp_path / "b" / "model.safetensors").is_file()
    # the dtype the weights are saved in (the fixture's config says float32; issue 10: it said float32 for bf16)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_model(tmp_path / "b", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


# What transformers makes of a config.json: equal between a fixture and our export of it.
HF_CONFIG_FIELDS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                    "rope_parameters", "tie_word_embeddings", "attention_bias", "sliding_window", "layer_types",
                    "bos_token_id", "eos_token_id", "pad_token_id", "dtype")


def hf_config_fields(config):
    """The fields above, and head_dim as the modeling code reads it (Qwen2's config has no such field)."""
    fields = {k: getattr(config, k, None) for k in HF_CONFIG_FIELDS}
    fields["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return fields


@pytest.mark.parametrize("name", ["hf-tiny-mistral", "hf-tiny-qwen2", "hf-tiny-qwen3"])
def test_saved_folder_loads_in_transformers_with_equal_logits(tmp_path, name):
    """Our export (config.json and tensor names) reads in transformers as the original folder does."""
    transformers = pytest.importorskip("transformers")
    e = load_file(str(FIXTURES / name / "expected_logits.safetensors"))
    model = load_model(FIXTURES / name)
    save_model(model, tmp_path / "m", max_shard_size="200KB")
    ours, theirs = (transformers.AutoConfig.from_pretrained(f, local_files_only=True)
                    for f in (tmp_path / "m", FIXTURES / name))
    assert hf_config_fields(ours) == hf_config_fields(theirs)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True).eval()
    with torch.no_grad():
        ref = hf(input_ids=e["input_ids"], attention_mask=e["attention_mask"], position_ids=e["position_ids"]).logits
        ours = model(e["input_ids"], e["attention_mask"], e["position_ids"])
    mask = e["attention_mask"].bool()
    assert (ref - ours)[mask].abs().max().item() <= 1e-4
    assert (ref - e["logits"])[mask].abs().max().item() <= 1e-4


def test_unsupported_architecture_is_one_line_naming_the_supported_list(tmp_path):
    shutil.copytree(FIXTURES / "hf-tiny-llama", tmp_path / "g")
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "g" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        load_model(tmp_path / "g")
    message = str(e.value)
    assert "\n" not in message and "GPT2LMHeadModel" in message and str(tmp_path / "g" / "config.json") in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES) and "Qwen3ForCausalLM" in message


def test_save_replaces_existing_checkpoint_atomically(tmp_path, monkeypatch):
    model = load_model(FIXTURES / "hf-tiny-llama")
    save_model(model, tmp_path / "c")
    before = (tmp_path / "c" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.norm.weight.add_(1.0)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("minispin.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tmp_path / "c")
    monkeypatch.undo()
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp folder left behind
    save_model(model, tmp_path / "c")
    assert torch.equal(load_model(tmp_path / "c").norm.weight, model.norm.weight)


def test_inv_freq_keys_are_ignored(tmp_path):
    shutil.copytree(FIXTURES / "hf-tiny-llama", tmp_path / "d")
    sd = load_file(str(tmp_path / "d" / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, str(tmp_path / "d" / "model.safetensors"), metadata={"format": "pt"})
    load_model(tmp_path / "d")


def broken_copy(tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(FIXTURES / "hf-tiny-llama", folder)
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_missing_tensor_is_listed(tmp_path):
    folder = broken_copy(tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder)


def test_unexpected_tensor_is_listed(tmp_path):
    folder = broken_copy(tmp_path, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(folder)


def test_misshaped_tensor_is_listed(tmp_path):
    folder = broken_copy(tmp_path, lambda sd: sd.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors: model\.norm\.weight: checkpoint \(65,\)"):
        load_model(folder)


def test_missing_shard_names_the_file(tmp_path):
    shutil.copytree(FIXTURES / "hf-tiny-mistral", tmp_path / "m")
    (tmp_path / "m" / "model-00004-of-00008.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00004-of-00008.safetensors"):
        load_model(tmp_path / "m")


def test_missing_config_and_pickle_only_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    shutil.copy(FIXTURES / "hf-tiny-llama" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(tmp_path)


def test_truncated_file_is_reported(tmp_path):
    folder = tmp_path / "t"
    shutil.copytree(FIXTURES / "hf-tiny-llama", folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_streaming_reader_matches_safetensors():
    f = FIXTURES / "hf-tiny-llama" / "model.safetensors"
    ref = load_file(str(f))
    ours = dict(iter_safetensors(f))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("300KB") == 300_000 and parse_size(123) == 123


def test_streaming_safetensors_writer_round_trips(tmp_path):
    """SafetensorsWriter (train-state saving, one tensor in memory at a time) writes what safetensors and
    iter_safetensors read back: several dtypes, a 0-dim and an empty tensor, odd byte sizes."""
    from safetensors.torch import load_file as st_load

    from minispin.checkpoint import SafetensorsWriter, iter_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=g), "b.bf16": torch.randn(7, generator=g).bfloat16(),
               "c.step": torch.tensor(4.0), "d.empty": torch.zeros(0, 3), "e.int": torch.arange(5, dtype=torch.int64),
               "f.half": torch.randn(1, 3, generator=g).half(), "g.flag": torch.tensor([True, False, True])}
    writer = SafetensorsWriter(tmp_path / "s.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    for got in (st_load(str(tmp_path / "s.safetensors")), dict(iter_safetensors(tmp_path / "s.safetensors"))):
        assert got.keys() == tensors.keys()
        for k, v in tensors.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    writer = SafetensorsWriter(tmp_path / "t.safetensors", [("x", torch.float32, (2,))])
    with pytest.raises(AssertionError):
        writer.write("y", torch.zeros(2))  # out of the announced order: refused, never a wrong header
