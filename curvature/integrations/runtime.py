"""Saved models in ONNX Runtime on the CPU: export, integer weights, checks and latency.

:func:`export` reads a folder that ``curvature prune`` wrote (dense, with structures removed,
quantized and packed, or both), exports the model's forward (``input_ids``, ``attention_mask``
and, where the model has segments, ``token_type_ids`` -> ``logits``) to ONNX with PyTorch's exporter, and optionally makes every linear layer an int8
matrix product (``int8=True``): ONNX Runtime's dynamic quantization (weights int8 per output
channel, activations uint8 per tensor, quantized on the fly), the product on the CPU's integer
dot-product units. Where the folder holds per-channel codes (a ``GPTQModifier`` with
``group_size: null``, any bits), those codes, scales and zero points are written into the runtime's
weights exactly; any other layer is rounded to nearest by the runtime
(``export.json`` lists the layers of each kind: ``saved_codes``, ``rounded_by_runtime``, and
``float_in_runtime`` for products the runtime leaves in float, such as a classifier on one token).
A word-embedding table saved with per-token codes (``embedding_bits: 8``) is looked up as int8
codes times each token's scale, so the runtime's file holds it at a byte per weight too
(``embedding_codes``). The activations' rounding is
the runtime's either way: the exported model is checked against the PyTorch model on a batch
(largest logit difference, agreement of the predicted class) and its latency measured beside the
PyTorch model's with the same threads.

Measured on MiniLM (``docs/compression.md``, 2 threads, each model in its own process): ONNX
Runtime float32 runs 1.8x PyTorch's forward at 16 x 128 tokens and 2.3x at 1 x 128; its int8
products 2.9x and 3.8x. Its 4-bit ``MatMulNBits`` kernel, probed once before choosing (raw output
not kept), was no faster than float32 at 16 x 128 (the products are compute-bound there), so 4-bit
weights are not a runtime choice here: per-channel 4-bit codes run as int8 products.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

FLOAT_TOLERANCE = 1e-4  # float32 export: largest logit difference over (1 + largest logit)
EXTRA = "install the optional extra: pip install -e '.[quant]' (onnx, onnxruntime, onnxscript)"


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"exporting to ONNX Runtime needs {exc.name}; {EXTRA}") from None


def load_saved(folder):
    """The model a prune run saved in ``folder``: structured (smaller matrices), packed or plain,
    as a plain float module (packed weights read back to float, no quantization hooks)."""
    from transformers import AutoConfig

    from curvature.integrations.structured import STRUCTURED, load_structured

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; give a folder written by curvature prune")
    quantized = "quantization_config" in json.loads((folder / "config.json").read_text())
    if (folder / STRUCTURED).is_file() or quantized:  # a plain float module, weights unpacked
        return load_structured(folder)
    import transformers

    config = AutoConfig.from_pretrained(folder)
    archs = [getattr(transformers, a, None) for a in config.architectures or []]
    cls = next((a for a in archs if a is not None), None)
    if cls is None:
        raise ValueError(f"{folder}: config.json names no architecture this transformers has")
    return cls.from_pretrained(folder).eval()


def saved_codes(folder) -> dict:
    """``{module name: (codes [rows, cols] int8, scale [rows], zero point [rows] int8)}`` of the
    per-channel layers the folder stores (signed codes, as the format stores them). A code of
    fewer bits is also an int8 code of the same scale and zero point, so 2- to 8-bit per-channel
    layers all run as int8 products exactly."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if not config:
        return {}
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    out = {}
    for scheme in config.get("config_groups", {}).values():
        w = scheme["weights"]
        if w["strategy"] != "channel":  # groups: one scale per column block, not int8 products
            continue
        for name in scheme["targets"]:
            if f"{name}.weight_packed" in state:
                from compressed_tensors.compressors.pack_quantized.helpers import (
                    unpack_from_int32,
                )

                shape = state[f"{name}.weight_shape"]
                codes = unpack_from_int32(state[f"{name}.weight_packed"], w["num_bits"], shape)
            else:
                codes = state[f"{name}.weight"]
            rows = codes.shape[0]
            zero = state.get(f"{name}.weight_zero_point", torch.zeros(rows, 1, dtype=torch.int8))
            out[name] = (
                codes.to(torch.int8),
                state[f"{name}.weight_scale"].reshape(rows).float(),
                zero.reshape(rows).to(torch.int8),
            )
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def _export_float(model, batch: dict, path: Path) -> None:
    import warnings

    axes = {k: {0: "batch", 1: "sequence"} for k in batch}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (), kwargs=batch, dynamo=True, dynamic_shapes=axes, verbose=False,
            output_names=["logits"],
        )  # fmt: skip
    program.save(str(path))


def _int8(model, float_path: Path, path: Path, codes: dict) -> dict:
    """Dynamic int8 products; the saved 8-bit codes written into the runtime's weights."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(float_path), str(path), weight_type=QuantType.QInt8, per_channel=True,
        op_types_to_quantize=["MatMul"],
    )  # fmt: skip
    linears, ambiguous = {}, set()
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):  # MatMul holds W^T, Gemm may hold W
            for d in {_digest(m.weight.detach().numpy()), _digest(m.weight.detach().T.numpy())}:
                if linears.get(d, n) != n:  # equal weights in two layers: which is which?
                    ambiguous.add(d)
                linears[d] = n
    for d in ambiguous:  # left to the runtime's rounding, never given another layer's codes
        linears[d] = None
    by_init, equal = {}, 0
    for init in onnx.load(str(float_path)).graph.initializer:
        if len(init.dims) == 2:
            d = _digest(numpy_helper.to_array(init))
            if d in ambiguous:
                equal += 1
            elif linears.get(d) is not None:
                by_init[init.name] = linears[d]
    q = onnx.load(str(path))
    inits = {i.name: i for i in q.graph.initializer}
    written, rounded, floats = [], [], []
    for init_name, module in by_init.items():
        if f"{init_name}_quantized" not in inits:  # a product the runtime keeps in float
            floats.append(module)
            continue
        if module not in codes:
            rounded.append(module)
            continue
        c, scale, zero = codes[module]
        for suffix, value in (
            ("_quantized", c.T.contiguous().numpy()),
            ("_scale", scale.numpy().astype(np.float32)),
            ("_zero_point", zero.numpy()),
        ):
            old = inits[f"{init_name}{suffix}"]
            new = numpy_helper.from_array(value.reshape(tuple(old.dims)), old.name)
            old.CopyFrom(new)
        written.append(module)
    embedding = _coded_embedding(model, q, codes)
    onnx.save(q, str(path))
    return {
        "saved_codes": sorted(written),
        "rounded_by_runtime": sorted(rounded),
        "float_in_runtime": sorted(floats),
        "equal_weights_left_to_runtime": equal,
        "embedding_codes": embedding,
    }


def _coded_embedding(model, graph_model, codes: dict) -> str | None:
    """The input embedding table, where the folder holds its per-token codes: the float table's
    lookup becomes a lookup of the int8 codes and of each token's scale (and zero point), and a
    product, so the runtime's file holds a byte per weight and computes the saved values."""
    from onnx import TensorProto, helper, numpy_helper

    emb = model.get_input_embeddings()
    name = next((n for n, m in model.named_modules() if m is emb), None)
    if name not in codes:
        return None
    want = _digest(emb.weight.detach().numpy())
    graph = graph_model.graph
    table = next(
        (
            i
            for i in graph.initializer
            if len(i.dims) == 2 and _digest(numpy_helper.to_array(i)) == want
        ),
        None,
    )
    gather = next(
        (
            n
            for n in graph.node
            if n.op_type == "Gather" and table is not None and n.input[0] == table.name
        ),
        None,
    )
    if gather is None:
        return None
    c, scale, zero = codes[name]
    base = table.name
    graph.initializer.remove(table)
    graph.initializer.extend([
        numpy_helper.from_array(c.numpy(), f"{base}_codes"),
        numpy_helper.from_array(scale.numpy().astype(np.float32)[:, None], f"{base}_token_scale"),
        numpy_helper.from_array(zero.numpy().astype(np.float32)[:, None], f"{base}_token_zero"),
    ])  # fmt: skip
    ids, out = gather.input[1], gather.output[0]
    nodes = [
        helper.make_node("Gather", [f"{base}_codes", ids], [f"{base}_q"]),
        helper.make_node("Cast", [f"{base}_q"], [f"{base}_qf"], to=TensorProto.FLOAT),
        helper.make_node("Gather", [f"{base}_token_zero", ids], [f"{base}_z"]),
        helper.make_node("Sub", [f"{base}_qf", f"{base}_z"], [f"{base}_centered"]),
        helper.make_node("Gather", [f"{base}_token_scale", ids], [f"{base}_s"]),
        helper.make_node("Mul", [f"{base}_centered", f"{base}_s"], [out]),
    ]
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for k, node in enumerate(nodes):
        graph.node.insert(at + k, node)
    return name


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _batch(model, size: int, length: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (size, length), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "type_vocab_size", 0) > 1:  # sentence pairs: segments are inputs
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


class OnnxModel(torch.nn.Module):
    """An exported model as a module: ``model(**batch).logits`` runs the ONNX Runtime session
    on the inputs it declares (read from the batch; other entries, such as labels, are not
    used), so the task evaluators score the runtime's model exactly as they score PyTorch's."""

    def __init__(self, path, threads: int | None = None):
        super().__init__()
        _require()
        self.session = _session(Path(path), threads or torch.get_num_threads())
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.config = None  # the exported model's configuration, written beside it by export
        if (Path(path).parent / "config.json").is_file():
            from transformers import AutoConfig

            self.config = AutoConfig.from_pretrained(Path(path).parent)
        self._device = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, **batch):
        from types import SimpleNamespace

        missing = [k for k in self.inputs if k not in batch]
        if missing:
            raise ValueError(f"the exported model needs {missing[0]}, which the batch lacks")

        feed = {k: batch[k].cpu().numpy() for k in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def export(
    folder, output, *, int8: bool = False, threads: int | None = None, length: int = 128,
    batches=(16, 1), measure: bool = True,
) -> dict:  # fmt: skip
    """Export the model saved in ``folder`` to ``output/model.onnx`` (see the module docstring);
    writes and returns ``output/export.json``."""
    from curvature.integrations.speed import _median

    _require()
    output = Path(output)
    model = load_saved(folder).eval()
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError(f"{folder}: the model is not float32; export runs float32 models")
    threads = threads or torch.get_num_threads()
    positions = getattr(model.config, "max_position_embeddings", length)
    length = min(length, positions)
    with torch.inference_mode():
        probe = model(**_batch(model, 1, 8))
    if not hasattr(probe, "logits"):
        names = (
            ", ".join(k for k in probe.keys()) if hasattr(probe, "keys") else type(probe).__name__
        )
        raise ValueError(
            f"{folder}: the model's output has no logits ({names}); export runs models with one "
            "logits output (classification, language models)"
        )
    output.mkdir(parents=True, exist_ok=True)
    float_path = output / "model-float32.onnx"
    _export_float(model, _batch(model, 2, 16), float_path)
    info: dict = {"folder": str(folder), "runtime": "onnxruntime", "threads": threads}
    path = float_path
    if int8:
        path = output / "model.onnx"
        info.update(_int8(model, float_path, path, saved_codes(folder)))
        float_path.unlink()
    else:
        path = float_path.rename(output / "model.onnx")
    info["bytes"] = path.stat().st_size
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights in model.onnx are the runtime's
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    session = _session(path, threads)
    check = _batch(model, 4, length)
    check["attention_mask"][1, length // 2 :] = 0  # padding exercised too
    with torch.inference_mode():
        want = _logits(model(**check)).numpy()
    got = session.run(["logits"], {k: v.numpy() for k, v in check.items()})[0]
    info["inputs"] = sorted(check)
    info["check"] = {
        "max_abs_difference": float(np.abs(got - want).max()),
        "max_abs_logit": float(np.abs(want).max()),
        "same_prediction": float((got.argmax(-1) == want.argmax(-1)).mean()),
    }
    scale = 1.0 + info["check"]["max_abs_logit"]
    if not int8 and info["check"]["max_abs_difference"] > FLOAT_TOLERANCE * scale:
        raise ValueError(
            f"the exported model's logits differ from PyTorch's by "
            f"{info['check']['max_abs_difference']:.3g} (tolerance {FLOAT_TOLERANCE:g} x (1 + "
            "largest logit)); the export is wrong and was not kept"
        )
    if measure:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        info["latency"] = []
        for size in batches:
            b = _batch(model, size, length)
            feed = {k: v.numpy() for k, v in b.items()}
            with torch.inference_mode():
                torch_ms = 1e3 * _median(lambda: model(**b), 7)  # noqa: B023
            ort_ms = 1e3 * _median(lambda: session.run(["logits"], feed), 7)  # noqa: B023
            info["latency"].append(
                {"batch_size": size, "sequence_length": length, "pytorch_ms": torch_ms,
                 "onnxruntime_ms": ort_ms, "speedup": torch_ms / ort_ms}
            )  # fmt: skip
        torch.set_num_threads(before)
    (output / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
