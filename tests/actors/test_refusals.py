"""Bad adapters and bad options stop the job before any row, with a message that names the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from actors import AdapterError, AdapterPool, GenerationConfig, LoGoPredictor, RoutingConfig
from actors.base import load_base
from tests.tiny import tiny_adapter, tiny_model_dir


@pytest.fixture(scope="module")
def base(tiny_dir):
    return load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]


def copy_adapter(pool_dir, tmp_path, name="a_attn"):
    dst = tmp_path / "pool" / name
    shutil.copytree(pool_dir / name, dst)
    return dst


def test_pickle_adapter_refused(base, pool_dir, tmp_path):
    dst = copy_adapter(pool_dir, tmp_path)
    torch.save(load_file(dst / "adapter_model.safetensors"), dst / "adapter_model.bin")
    (dst / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model\.bin.*only safetensors is loaded"):
        AdapterPool.load(tmp_path / "pool", base)


def test_shape_mismatch_names_adapter_and_module(base, tmp_path):
    other = tiny_model_dir(tmp_path / "other", hidden=32, heads=2, kv_heads=1, intermediate=64)
    tiny_adapter(other, tmp_path / "pool" / "wrong_base", target_modules=("q_proj",))
    with pytest.raises(AdapterError, match=r"adapter 'wrong_base': module 'model\.layers\.0\.self_attn\.q_proj' "
                                           r"factor shapes .* do not fit the base layer \(64 x 64\)"):
        AdapterPool.load(tmp_path / "pool", base)


def test_nan_weights_refused(base, pool_dir, tmp_path):
    dst = copy_adapter(pool_dir, tmp_path)
    tensors = load_file(dst / "adapter_model.safetensors")
    key = next(k for k in tensors if "layers.2.self_attn.v_proj.lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, dst / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"'a_attn': module 'model\.layers\.2\.self_attn\.v_proj' has NaN"):
        AdapterPool.load(tmp_path / "pool", base)


def test_unknown_module_refused(base, pool_dir, tmp_path):
    dst = copy_adapter(pool_dir, tmp_path)
    tensors = load_file(dst / "adapter_model.safetensors")
    tensors = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qkv"): v for k, v in tensors.items()}
    save_file(tensors, dst / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"module 'model\.layers\.0\.self_attn\.qkv' does not exist"):
        AdapterPool.load(tmp_path / "pool", base)


@pytest.mark.parametrize("field,value,message", [
    ("peft_type", "IA3", "only LoRA adapters"),
    ("use_dora", True, "DoRA adapters are not supported"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
])
def test_unsupported_config_refused(base, pool_dir, tmp_path, field, value, message):
    dst = copy_adapter(pool_dir, tmp_path)
    config = json.loads((dst / "adapter_config.json").read_text())
    config[field] = value
    (dst / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=message):
        AdapterPool.load(tmp_path / "pool", base)


def test_empty_pool_refused(base, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="empty"):
        AdapterPool.load(tmp_path / "empty", base)
    with pytest.raises(AdapterError, match="empty"):
        AdapterPool.load({}, base)


@pytest.mark.parametrize("options,message", [
    (dict(k=0), r"^k: must be an integer >= 1 .*; got 0$"),
    (dict(k=2.5), r"^k: must be an integer >= 1 .*; got 2\.5$"),
    (dict(signal="cosine"), r"^signal: must be one of norm, entropy; got 'cosine'$"),
    (dict(probe_input="output"), r"^probe_input: must be one of residual, module_input; got 'output'$"),
    (dict(probe_layer=9), r"probe_layers=9: block 9 is out of range .* 4 blocks"),
    (dict(probe_layers=[0, -5]), r"probe_layers=\(0, -5\): block -5 is out of range .* 4 blocks"),
    (dict(probe_layers="last"), r"^probe_layers: give a block index .* or all; got 'last'$"),
    (dict(probe_layers=-1, probe_layer=-1), r"pass probe_layers .* not also probe_layer"),
    (dict(probe_module="qkv"), r"probe_module=.qkv.: no adapter .* linear modules are \[.down_proj., .gate_proj."),
    (dict(overlong="drop"), r"^overlong: must be one of truncate, error; got 'drop'$"),
    (dict(max_new_tokens=0), r"^max_new_tokens: must be an integer >= 1; got 0$"),
    (dict(generate_step_slots=-1.0), r"^generate_step_slots: must be a number >= 0; got -1\.0$"),
    (dict(max_groups=4), r"^option\(s\) \['max_groups'\] no longer change anything .*; remove them$"),
    (dict(routing=RoutingConfig(k=2), k=3), r"^k=3 and routing=RoutingConfig\(k=2, \.\.\.\) disagree; set k in one "
                                            r"place only$"),
    (dict(generation=GenerationConfig(max_new_tokens=2), max_new_tokens=4),
     r"^max_new_tokens=4 and generation=GenerationConfig\(max_new_tokens=2, \.\.\.\) disagree"),
    (dict(routing={"k": 2}), r"^routing=\{'k': 2\}: pass an actors\.options\.RoutingConfig$"),
    (dict(dtype="int8"), r"dtype='int8'"),
    (dict(kk=3), r"unknown option\(s\) \['kk'\]; known options: model, adapters, routing, generation, .*\bk\b"),
])
def test_bad_options_refused(tiny_dir, pool_dir, options, message):
    with pytest.raises(ValueError, match=message):
        LoGoPredictor(model=tiny_dir, adapters=pool_dir, device="cpu", **options)


def test_bad_model_path_refused(pool_dir, tmp_path):
    with pytest.raises(ValueError, match="not a model directory"):
        LoGoPredictor(model=tmp_path, adapters=pool_dir, device="cpu")
