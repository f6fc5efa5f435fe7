"""Stacked storage: mixed ranks and alphas, rsLoRA, adapters over different module sets."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from actors import AdapterPool
from actors.base import load_base
from tests.actors.conftest import POOL


def test_device_factors_match_peft_factors_and_scaling(tiny_dir, pool_dir):
    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    pool = AdapterPool.load(pool_dir, model)
    assert pool.names == tuple(sorted(POOL))
    held = pool.acquire(range(len(pool)))
    assert pool.nbytes == pool.full_nbytes == sum(A.nbytes + B.nbytes for f in held.values() for A, B in f.values()) > 0
    assert "6 adapters" in pool.describe()
    for name in pool.names:
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), pool_dir / name)
        factors, seen = held[pool.index(name)], 0
        for path, layer in peft.base_model.model.named_modules():
            if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
                continue
            A, B = factors[path]
            assert A.shape[0] == pool.entries[pool.index(name)].ranks[path] == layer.r["default"] == POOL[name]["r"]
            torch.testing.assert_close(A, layer.lora_A["default"].weight)
            torch.testing.assert_close(B, layer.lora_B["default"].weight * layer.scaling["default"])
            seen += 1
        assert seen == len(factors) > 0  # the modules it does not adapt hold nothing for it
    assert "model.layers.3.self_attn.q_proj" not in held[pool.index("d_first_layers")]
    assert "model.layers.3.self_attn.q_proj" in pool.modules


def test_pool_from_mapping_and_dtype(tiny_dir, pool_dir):
    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    pool = AdapterPool.load({"z": pool_dir / "b_qv", "y": pool_dir / "a_attn"}, model, dtype=torch.bfloat16)
    assert pool.names == ("y", "z")
    assert all(A.dtype == B.dtype == torch.bfloat16 for f in pool.acquire([0, 1]).values() for A, B in f.values())
    with pytest.raises(ValueError, match="itself a single adapter"):
        AdapterPool.load(pool_dir / "b_qv", model)
