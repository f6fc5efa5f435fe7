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


def test_stacks_match_peft_factors_and_scaling(tiny_dir, pool_dir):
    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    pool = AdapterPool.load(pool_dir, model)
    assert pool.names == tuple(sorted(POOL))
    assert pool.nbytes == sum(s.A.nbytes + s.B.nbytes for s in pool.modules.values()) > 0
    assert "6 adapters" in pool.describe()
    for name in pool.names:
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), pool_dir / name)
        seen = 0
        for path, layer in peft.base_model.model.named_modules():
            if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
                continue
            stacked, i = pool.modules[path], pool.index(name)
            cols = slice(stacked.starts[i], stacked.starts[i] + stacked.ranks[i])
            assert stacked.ranks[i] == layer.r["default"] == POOL[name]["r"]
            torch.testing.assert_close(stacked.A[cols], layer.lora_A["default"].weight)
            torch.testing.assert_close(stacked.B[:, cols], layer.lora_B["default"].weight * layer.scaling["default"])
            seen += 1
        # Modules this adapter does not adapt hold rank 0 for it.
        absent = [m for m, s in pool.modules.items() if s.ranks[pool.index(name)] == 0]
        assert seen + len(absent) == len(pool.modules)
    assert pool.modules["model.layers.3.self_attn.q_proj"].ranks[pool.index("d_first_layers")] == 0


def test_pool_from_mapping_and_dtype(tiny_dir, pool_dir):
    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    pool = AdapterPool.load({"z": pool_dir / "b_qv", "y": pool_dir / "a_attn"}, model, dtype=torch.bfloat16)
    assert pool.names == ("y", "z")
    assert all(s.A.dtype == torch.bfloat16 for s in pool.modules.values())
    with pytest.raises(ValueError, match="itself a single adapter"):
        AdapterPool.load(pool_dir / "b_qv", model)
