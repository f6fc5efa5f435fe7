"""Hostile adapters and numeric overflow: refused at load with the adapter named, or an error on the
affected rows only; generation ends at every end id the model declares."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from actors import AdapterError, AdapterPool, LoGoPredictor
from actors.base import load_base
from actors.router import Routing

PROMPTS = ["hello there", "abc", "2+2="]


@pytest.fixture(scope="module")
def base(tiny_dir):
    return load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]


def scaled_adapter(src, dst, factor, keep=lambda key: True):
    """A copy of adapter `src` with its lora_B factors times `factor`, keeping the tensors `keep` allows."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "adapter_model.safetensors")
    tensors = {k: v * factor if "lora_B" in k else v for k, v in tensors.items() if keep(k)}
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


# -- case 2: huge finite weights, dtype overflow ------------------------------------------------

def test_overflowing_row_is_an_error_and_its_batch_mates_are_untouched(tiny_dir, pool_dir, tmp_path):
    huge = scaled_adapter(pool_dir / "a_attn", tmp_path / "huge", 1e18, keep=lambda k: "v_proj" in k)
    predictor = LoGoPredictor(model=tiny_dir, adapters={"ok": pool_dir / "b_qv", "huge": huge}, k=1,
                              max_new_tokens=5, device="cpu")
    engine, pool = predictor.engine, predictor.pool
    seqs = [predictor.encode(p)[0] for p in PROMPTS]
    ok, bad = Routing((pool.index("ok"),), ("ok",), (1.0,)), Routing((pool.index("huge"),), ("huge",), (1.0,))
    texts, counts, stats = engine.generate(seqs, [ok, bad, ok])
    assert set(stats.errors) == {1}
    assert "overflowed (NaN or inf) at new token 1 with adapters ['huge']" in stats.errors[1]
    assert counts[1] == 0, "the overflowing row is ended at once"
    alone, alone_counts, alone_stats = engine.generate([seqs[0], seqs[2]], [ok, ok])
    assert [texts[0], texts[2]] == alone and [counts[0], counts[2]] == alone_counts == [5, 5]
    assert not alone_stats.errors


def test_non_finite_routing_scores_become_row_errors(tiny_dir, pool_dir, tmp_path):
    huge = scaled_adapter(pool_dir / "b_qv", tmp_path / "huge", 1e18)  # adapts the probe module
    # raw scores (the paper's): the huge adapter's score overflows float32; calibrated z-scores divide
    # the gain out, and the overflow is then caught in generation (the test above)
    predictor = LoGoPredictor(model=tiny_dir, adapters={"a": pool_dir / "a_attn", "huge": huge}, k=2,
                              max_new_tokens=4, device="cpu", calibration_score="raw")
    out = predictor({"prompt": np.array(PROMPTS, dtype=object)})
    for row in range(len(PROMPTS)):
        assert "routing weights are not finite (adapters ['huge']" in out["error"][row]
        assert out["output"][row] is None and out["weights"][row] == [] and out["adapters"][row] == []
    assert predictor.stats.errors == len(PROMPTS)


def test_factors_beyond_the_pool_dtype_are_refused_at_load(base, pool_dir, tmp_path):
    scaled_adapter(pool_dir / "b_qv", tmp_path / "pool" / "big", 1e6)  # finite in float32, not in float16
    AdapterPool.load(tmp_path / "pool", base, dtype=torch.float32)
    with pytest.raises(AdapterError, match=r"adapter 'big': module 'model\.layers\.0\.self_attn\.q_proj' has a "
                                           r"factor entry of .* beyond the largest float16 value"):
        AdapterPool.load(tmp_path / "pool", base, dtype=torch.float16)


# -- case 7: several end ids ---------------------------------------------------------------------

def test_generation_stops_at_every_end_id_of_the_generation_config(tiny_dir, pool_dir, tmp_path):
    options = dict(adapters=pool_dir, k=2, max_new_tokens=8, device="cpu")
    before = LoGoPredictor(model=tiny_dir, **options)
    text = before({"prompt": np.array(["hello there"], dtype=object)})["output"][0]
    assert len(text) == 8
    cut = next(i for i in range(1, len(text)) if text[i] not in text[:i])  # a character not seen before it
    model = shutil.copytree(tiny_dir, tmp_path / "model")
    tok = before.tokenizer
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = [tok.eos_token_id, tok.convert_tokens_to_ids(text[cut])]
    (model / "generation_config.json").write_text(json.dumps(config))
    after = LoGoPredictor(model=model, **options)
    out = after({"prompt": np.array(["hello there"], dtype=object)})
    assert out["output"][0] == text[:cut] and out["output_tokens"][0] == cut


# -- case 14 and 16: malformed adapter fields and files ------------------------------------------

def copy_adapter(pool_dir, tmp_path, name="a_attn"):
    return shutil.copytree(pool_dir / name, tmp_path / "pool" / name)


@pytest.mark.parametrize("edit,message", [
    ({"lora_alpha": "eight"}, r"lora_alpha='eight' in .*adapter_config\.json must be a finite number"),
    ({"alpha_pattern": {"q_proj[": 4}}, r"alpha_pattern key 'q_proj\[' in .* is not a valid regular expression"),
    ({"rank_pattern": {"q_proj": "four"}}, r"rank_pattern\['q_proj'\]='four' .* must be an integer >= 1"),
    ({"rank_pattern": {"q_proj": 8}}, r"module 'model\.layers\.0\.self_attn\.q_proj' has rank 4 .* declares r=8"),
    ({"r": True}, r"r=True .* must be an integer >= 1"),
])
def test_malformed_adapter_fields_name_adapter_file_and_key(base, pool_dir, tmp_path, edit, message):
    dst = copy_adapter(pool_dir, tmp_path)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(AdapterError, match=r"adapter 'a_attn': .*" + message):
        AdapterPool.load(tmp_path / "pool", base)


def write_header(path, header: dict, data_bytes: int, header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(raw) if header_len is None else header_len).to_bytes(8, "little"))
        f.write(raw)
        f.truncate(8 + len(raw) + data_bytes)  # sparse: no data blocks are written


def test_huge_safetensors_header_is_refused(base, pool_dir, tmp_path):
    dst = copy_adapter(pool_dir, tmp_path)
    write_header(dst / "adapter_model.safetensors", {}, 16, header_len=2**60)
    with pytest.raises(AdapterError, match=r"adapter 'a_attn': .* not a valid safetensors file: its header "
                                           r"declares 1152921504606846976 bytes"):
        AdapterPool.load(tmp_path / "pool", base)


def test_tensor_larger_than_the_file_is_refused(base, pool_dir, tmp_path):
    dst = copy_adapter(pool_dir, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    write_header(dst / "adapter_model.safetensors",
                 {key: {"dtype": "F32", "shape": [16384, 16384], "data_offsets": [0, 2**30]}}, 4096)
    with pytest.raises(AdapterError, match=r"tensor '.*q_proj\.lora_A\.weight' \(F32 \[16384, 16384\]\) declares "
                                           r"bytes 0\.\.1073741824, but the file holds 4096 bytes"):
        AdapterPool.load(tmp_path / "pool", base)


def test_sparse_file_declaring_a_gigabyte_is_refused_before_reading(base, pool_dir, tmp_path):
    dst = copy_adapter(pool_dir, tmp_path)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    r, gib = 2**22, 2**30  # (r, 64) float32 = 1 GiB per factor
    write_header(dst / "adapter_model.safetensors", {
        f"{module}.lora_A.weight": {"dtype": "F32", "shape": [r, 64], "data_offsets": [0, gib]},
        f"{module}.lora_B.weight": {"dtype": "F32", "shape": [64, r], "data_offsets": [gib, 2 * gib]},
    }, 2 * gib)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "r": r}))  # consistent with the file
    assert (dst / "adapter_model.safetensors").stat().st_size > 2 * gib
    with pytest.raises(AdapterError, match=r"module 'model\.layers\.0\.self_attn\.q_proj' declares rank 4194304, "
                                           r"above the layer's sides \(64 x 64\)"):
        AdapterPool.load(tmp_path / "pool", base)


def test_links_out_of_the_pool_are_refused(base, pool_dir, tmp_path):
    outside = shutil.copytree(pool_dir / "b_qv", tmp_path / "elsewhere" / "b_qv")
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterError, match=r"adapter 'linked': .* is a link to .*elsewhere/b_qv, outside the pool"):
        AdapterPool.load(tmp_path / "pool", base)
    (tmp_path / "pool" / "linked").unlink()
    dst = copy_adapter(pool_dir, tmp_path)
    (dst / "adapter_model.safetensors").unlink()
    (dst / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"adapter 'a_attn': .*adapter_model\.safetensors is a link to .*, "
                                           r"outside the adapter directory"):
        AdapterPool.load(tmp_path / "pool", base)
