"""Quantized models saved in a maintained packed format: codes round-trip bit for bit, plain
``transformers`` loads the folder and computes what the quantized model computed, the file is
really smaller, and what the format cannot store is one clear line before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from models import tiny_llama_config

pytest.importorskip("compressed_tensors")

from curvature.integrations.packed import packed_tensors, save_packed  # noqa: E402
from curvature.pruning.quantization import Quantize, quantize_model  # noqa: E402


def _llama(**extra):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(tiny_llama_config(64, max_position_embeddings=64, **sizes, **extra))


def _data(n=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 16), generator=gen) for _ in range(n)]


def _quantized(**part):
    model = _llama().eval()
    rep = quantize_model(
        model, _data(), lambda m, b: m(input_ids=b, labels=b).loss, Quantize(**part),
        progress=False,
    )  # fmt: skip
    return model, rep


@pytest.mark.parametrize(
    "part, fmt",
    [
        (dict(bits=4, group=16, symmetric=True), "pack-quantized"),
        (dict(bits=3, group=None, symmetric=True), "pack-quantized"),
        (dict(bits=8, group=None, symmetric=True), "pack-quantized"),
        (
            dict(bits=2, group=16, symmetric=True, act_order=True, static_groups=True),
            "pack-quantized",
        ),
        (dict(bits=4, group=16, symmetric=False), "int-quantized"),
        (dict(bits=8, group=None, symmetric=False, act_order=True), "int-quantized"),
    ],
)
def test_plain_transformers_loads_what_the_quantized_model_computes(tmp_path, part, fmt):
    from transformers import AutoModelForCausalLM

    model, rep = _quantized(**part)
    info = save_packed(model, rep, tmp_path)
    assert info["format"] == fmt and info["layers"] == 15
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = _data(2, seed=5)[1]
    with torch.no_grad():
        want, got = model(input_ids=x).logits, loaded(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the loaded weights are the quantized weights (to float32 rounding of scale * code)
    for name, q in rep.layers.items():
        w = loaded.get_parameter(name)
        torch.testing.assert_close(w.double(), q.weight, rtol=1e-6, atol=1e-7)


def test_packed_codes_round_trip_bit_for_bit_and_the_file_is_smaller(tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model, rep = _quantized(bits=4, group=16, symmetric=True)
    state, _ = packed_tensors(model, rep)
    for name, q in rep.layers.items():
        module = name.removesuffix(".weight")
        codes = unpack_from_int32(state[f"{module}.weight_packed"], 4, q.codes.shape)
        assert torch.equal(codes.long(), q.codes.long() - 8)
        assert state[f"{module}.weight_packed"].dtype == torch.int32
        assert state[f"{module}.weight_packed"].numel() * 32 == q.codes.numel() * 4
    info = save_packed(model, rep, tmp_path / "q")
    model.save_pretrained(tmp_path / "dense")
    dense = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert info["bytes"] == (tmp_path / "q" / "model.safetensors").stat().st_size
    from safetensors import safe_open

    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        payload = sum(f.get_tensor(k).nbytes for k in f.keys())
    linear = sum(q.codes.numel() for q in rep.layers.values())
    groups = sum(q.scales.numel() for q in rep.layers.values())
    # 4-bit codes (int32 words), float32 scales per group of 16, two int64 per shape
    want = dense_payload(tmp_path / "dense") - 4 * linear + linear // 2 + 4 * groups + 16 * 15
    assert payload == want
    assert dense > 3 * info["bytes"]


def dense_payload(folder):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


def test_weights_off_their_grid_are_refused(tmp_path):
    model, rep = _quantized(bits=4, group=16, symmetric=True)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3  # trained after quantizing
    with pytest.raises(ValueError, match=r"^model.layers.1.mlp.up_proj: the weights are not on"):
        save_packed(model, rep, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_what_the_format_cannot_store_is_one_line_before_writing(tmp_path):
    from curvature.integrations.packed import check_packable

    with pytest.raises(ValueError, match=r"^group 128 does not divide the 576 input columns of k"):
        check_packable(Quantize(group=128), {"q": 512, "k": 576})
    with pytest.raises(ValueError, match=r"^act_order with groups fitted during the sweep"):
        check_packable(Quantize(group=16, act_order=True), {"q": 32})
    check_packable(Quantize(group=None, act_order=True), {"q": 576})
    model, rep = _quantized(bits=4, group=16, act_order=True, symmetric=True)
    with pytest.raises(ValueError, match="act_order with groups"):
        save_packed(model, rep, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_a_structured_and_quantized_bert_loads_back_and_computes_the_same(tmp_path):
    from models import tiny_bert

    from curvature.integrations.structured import load_structured, save_structured
    from curvature.pruning import structured

    model = tiny_bert().eval()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(5, 64, (3, 10), generator=gen) for _ in range(6)]
    rep = structured.run(model, data, lambda m, b: m(input_ids=b), {"heads": 0.5}, progress=False)
    q = quantize_model(
        model, data, lambda m, b: m(input_ids=b).logits.square().mean(),
        Quantize(bits=4, group=8, symmetric=True), progress=False,
    )  # fmt: skip
    out = tmp_path / "bert"
    info = save_packed(
        model, q, out, save=lambda state: save_structured(model, rep.groups, out, state_dict=state)
    )
    assert info["format"] == "pack-quantized"
    back = load_structured(out)  # one head of two per block: the structured loader
    assert back.bert.encoder.layer[0].attention.self.query.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=data[0]).logits, model(input_ids=data[0]).logits, rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_embedding_table_rounded_per_token_is_saved_and_loaded(tmp_path, symmetric):
    from transformers import AutoModelForCausalLM

    dense = _llama().eval().model.embed_tokens.weight.detach().clone()
    model, rep = _quantized(bits=4, group=16, symmetric=symmetric, embedding_bits=8)
    name, q = rep.embedding
    assert name == "model.embed_tokens.weight" and q.scales.shape == (64, 1)
    emb = model.model.embed_tokens.weight.detach()
    from curvature.pruning.quantize import Grid, rtn

    want = rtn(dense, Grid(bits=8, group=None, symmetric=symmetric)).weight
    torch.testing.assert_close(emb.double(), want, rtol=1e-6, atol=1e-7)
    info = save_packed(model, rep, tmp_path)
    assert info["embedding"] == name
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2
    assert config["config_groups"]["group_1"]["format"] == "int-quantized"  # one byte per code
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = _data(2, seed=5)[1]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=1e-6
        )


def test_a_tied_embedding_is_refused_before_any_work():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64, tie_word_embeddings=True))
    before = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^embedding_bits: model.embed_tokens.weight is tied"):
        quantize_model(
            model, _data(), lambda m, b: m(input_ids=b, labels=b).loss,
            Quantize(embedding_bits=8), progress=False,
        )  # fmt: skip
    assert torch.equal(model.model.embed_tokens.weight, before)
    with pytest.raises(ValueError, match=r"^embedding_bits must be one of \(2, 3, 4, 8\), got 5"):
        Quantize(embedding_bits=5)
    from curvature.integrations.packed import check_packable

    with pytest.raises(ValueError, match=r"^embedding_bits 4: an embedding table is saved one"):
        check_packable(Quantize(embedding_bits=4), {"q": 128})


def test_a_bfloat16_model_is_saved_with_its_exact_codes(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _llama().to(torch.bfloat16).eval()
    rep = quantize_model(
        model, _data(), lambda m, b: m(input_ids=b, labels=b).loss,
        Quantize(bits=8, group=16, symmetric=True), progress=False,
    )  # fmt: skip
    state, _ = packed_tensors(model, rep)  # 8-bit codes are not all exact in bfloat16 weights
    save_packed(model, rep, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        loaded(input_ids=_data(1)[0])  # the library unpacks the weights on the first forward
    for name in rep.layers:
        torch.testing.assert_close(
            loaded.get_parameter(name).float(), model.get_parameter(name).float(),
            rtol=2 ** -7, atol=1e-6,
        )  # fmt: skip


def test_a_rank_that_writes_no_folder_adds_no_config_and_does_not_fail(tmp_path):
    """Under torch.distributed only rank 0 writes the folder; the others' ``save`` writes
    nothing, and ``save_packed`` must neither fail on the missing config nor write one."""
    model, rep = _quantized(bits=4, group=16, symmetric=True)
    info = save_packed(model, rep, tmp_path, save=lambda state: None)
    assert info["format"] is None and info["bytes"] == 0 and info["layers"] == 15
    assert list(tmp_path.iterdir()) == []
