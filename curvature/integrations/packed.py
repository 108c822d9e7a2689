"""Quantized weights saved small, in a maintained format that plain ``transformers`` loads.

:func:`save_packed` writes a ``save_pretrained`` folder in a format of the ``compressed-tensors``
library (optional extra ``[quant]``): every quantized linear layer's integer codes, its scales
(``weight_scale``, ``[rows, groups]``, the model's float type), its zero points for an asymmetric
grid and its shape; the other tensors as they are; the grid in ``config.json``'s
``quantization_config``. ``AutoModel...from_pretrained(folder)`` loads it in plain ``transformers``
with ``compressed-tensors`` installed (the weights are unpacked to float on the first forward).

- Symmetric grids: ``pack-quantized``, the codes packed into int32 words (32 codes in ``bits``
  words): a 4-bit layer takes half a byte per weight.
- Asymmetric grids: ``int-quantized``, one int8 byte per code (the same size at 8 bits, twice the
  packed size at 4). The library packs asymmetric zero points when it saves but its loader expects
  them unpacked (``compressed-tensors`` 0.20.1: such files do not load), so they are not packed.

The packing is the library's own: the quantized weights are handed to it with their scales and
zero points, it rounds them back to codes, and :func:`packed_tensors` checks that those are this
toolkit's codes bit for bit. The library stores signed codes: a code ``q`` of this toolkit's grids
(``0 .. 2^bits - 1``, zero point ``z``) is ``q - 2^(bits-1)`` there, and so is its zero point (a
symmetric grid's ``2^(bits-1)`` becomes 0 and is not stored). What the format cannot say is
refused in one line before anything is written: embedding tables below 8 bits (they are saved one
byte per code, since ``transformers``' initializer of a packed embedding reads a float weight that
is not there: ``transformers`` 5.24), a group that does not divide a layer's columns
(the format has no shorter last group), act-order with groups fitted during the sweep (their
columns are not contiguous: use ``static_groups`` or per-channel grids), a weight that is not an
``nn.Linear``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PACKED, BYTES = "pack-quantized", "int-quantized"
EXTRA = "install the optional extra: pip install -e '.[quant]' (compressed-tensors)"


def _library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ValueError(f"saving packed weights needs compressed-tensors; {EXTRA}") from None
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    return QuantizationArgs, QuantizationConfig, QuantizationScheme


def check_packable(part, layers: dict) -> None:
    """One clear ``ValueError`` if the part's grid on these layers (``{name: cols}``) cannot be
    written in the packed format. Called before quantizing, so nothing is computed in vain."""
    _library()
    if part.embedding_bits is not None and part.embedding_bits != 8:
        raise ValueError(
            f"embedding_bits {part.embedding_bits}: an embedding table is saved one byte per code "
            "(plain transformers cannot load a packed one: its initializer reads the table's float "
            "weight), so only 8 bits make it smaller; use embedding_bits 8"
        )
    if part.group is not None:
        for name, cols in layers.items():
            if cols % part.group:
                raise ValueError(
                    f"group {part.group} does not divide the {cols} input columns of {name}: the "
                    "packed format has no shorter last group; choose a group that divides every "
                    "layer's columns (or group none), or save without --packed"
                )
        if part.act_order and not part.static_groups:
            raise ValueError(
                "act_order with groups fitted during the sweep gives groups of scattered columns, "
                "which the packed format cannot store; set static_groups (or group none), or save "
                "without --packed"
            )


def _module_name(param_name: str) -> str:
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def _scheme(bits, group, symmetric, act_order, names):
    args_cls, _, scheme_cls = _library()
    args = args_cls(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="group" if group is not None else "channel",
        group_size=group,
        actorder="weight" if act_order else None,
    )
    return scheme_cls(targets=sorted(names), weights=args, format=file_format(symmetric))


def file_format(symmetric: bool) -> str:
    """``pack-quantized`` for symmetric grids; ``int-quantized`` (one byte per code) for
    asymmetric ones, whose packed zero points the library's loader does not read back."""
    return PACKED if symmetric else BYTES


def packed_tensors(model, report) -> tuple[dict, list]:
    """``(state dict with every quantized layer's weight packed, the schemes)``: one scheme for
    the linear layers, one for the input embedding table when it was quantized too."""
    modules = dict(model.named_modules())
    part = report.part
    names = [_module_name(n) for n in report.layers]
    for n in names:
        if type(modules.get(n)) is not torch.nn.Linear:
            raise ValueError(f"{n} is not an nn.Linear; the packed format stores linear layers")
    check_packable(part, {n: modules[n].in_features for n in names})
    state = dict(model.state_dict())
    schemes = []
    if names:
        scheme = _scheme(part.bits, part.group, part.symmetric, part.act_order, names)
        schemes.append(scheme)
        for param_name, q in report.layers.items():
            _pack(state, _module_name(param_name), q, scheme, part.bits, part.group)
    if report.embedding is not None:
        param_name, q = report.embedding
        name = _module_name(param_name)
        scheme = _scheme(part.embedding_bits, None, part.symmetric, False, [name])
        scheme.format = BYTES  # see check_packable
        schemes.append(scheme)
        _pack(state, name, q, scheme, part.embedding_bits, None)
    return state, schemes


def _pack(state: dict, name: str, q, scheme, bits: int, group) -> None:
    """Replace ``name``'s weight in ``state`` by the library's compressed tensors, checked.

    The library rounds float weights back to codes with the stored scales, so it is handed the
    codes' own values at those scales (in float32), whatever the model's float type: the codes
    it stores are then this toolkit's codes exactly, which is checked, and the model's weights are
    checked to be those values to the rounding of its float type (weights changed after
    quantizing are refused)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    half = 2 ** (bits - 1)
    weight = state.pop(f"{name}.weight").detach()
    scales = q.scales.to(weight.dtype)
    zeros = (q.zeros.to(torch.int16) - half).to(torch.int8)
    ours = (q.codes.to(torch.int16) - half).to(torch.int8)
    cols = q.g_idx.to(weight.device)
    values = (ours.float() - zeros.float()[:, cols]) * scales.float()[:, cols]
    if group is None:
        scales, zeros = scales.reshape(-1, 1), zeros.reshape(-1, 1)
    local = {"weight": values, "weight_scale": scales, "weight_zero_point": zeros}
    packed = compressor.compress(local, scheme)
    codes = (
        unpack_from_int32(packed["weight_packed"], bits, weight.shape)
        if "weight_packed" in packed
        else packed["weight"]
    )
    rtol = 8 * torch.finfo(weight.dtype).eps  # scale x code, rounded once in the model's type
    if not torch.equal(codes.to(torch.int8), ours) or not torch.allclose(
        weight.float(), values, rtol=rtol, atol=1e-12
    ):
        raise ValueError(
            f"{name}: the weights are not on their quantization grid (changed after "
            "quantizing?); quantize again before saving packed"
        )
    for k, v in packed.items():
        state[f"{name}.{k}"] = v


def save_packed(model, report, folder, tokenizer=None, save=None) -> dict:
    """Write ``model`` with ``report``'s layers packed into ``folder`` (see the module docstring).

    ``save(state_dict)``: how the folder is written (default ``model.save_pretrained``; the
    structured save passes its own so a smaller model is saved with its sizes). Returns the file
    size and the bits per parameter of the file."""
    _, config_cls, _ = _library()
    folder = Path(folder)
    state, schemes = packed_tensors(model, report)
    if save is None:
        model.save_pretrained(folder, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    else:
        save(state)
    path = folder / "config.json"
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    params = sum(p.numel() for p in model.parameters())
    info = {
        "format": None,
        "bytes": size,
        "parameters": params,
        "bits_per_parameter": 8 * size / params,
        "layers": len(report.layers),
        "embedding": report.embedding[0] if report.embedding is not None else None,
    }
    if not path.is_file():  # under torch.distributed only rank 0 writes the folder
        return info
    formats = sorted({s.format for s in schemes})
    config = config_cls(
        config_groups={f"group_{i}": s for i, s in enumerate(schemes)},
        format=formats[0] if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
    )
    data = json.loads(path.read_text())
    data["quantization_config"] = {
        "quant_method": "compressed-tensors",
        **config.model_dump(exclude={"quant_method"}),
    }
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    info["format"] = config.format
    return info


def unpacked(state: dict, quantization_config: dict) -> dict:
    """``state`` (tensors read from a folder :func:`save_packed` wrote) with every quantized
    layer's weight read back to float, as the library reads it."""
    _, config_cls, _ = _library()
    from compressed_tensors.compressors import BaseCompressor

    config = config_cls.model_validate(
        {k: v for k, v in quantization_config.items() if k != "quant_method"}
    )
    state = dict(state)
    for scheme in config.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        for name in scheme.targets:
            prefix = f"{name}."
            own = [k for k in state if k.startswith(prefix + "weight")]
            local = {k[len(prefix) :]: state.pop(k) for k in own}
            state[f"{name}.weight"] = compressor.decompress(local, scheme)["weight"]
    return state
