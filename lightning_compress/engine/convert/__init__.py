"""A real int8 model, built from a *copy* of a float or fake-quant model, through torchao's pt2e flow.

``torch.export`` (dynamic batch; dynamic sequence/spatial sizes where the network takes them) → ``prepare_pt2e``
with ``X86InductorQuantizer`` → calibration → ``convert_pt2e`` → unused float tensors dropped → ``torch.export``
again, so the result is a ``torch.export.ExportedProgram`` that
``save_int8`` / ``load_int8`` store with ``torch.export.save`` / ``torch.export.load``.

The input model is never modified. When it was prepared by ``prepare_qat``,
the conversion starts from a stripped float copy, reuses the input ranges learned by the fake-quant observers
(instead of re-calibrating them) and keeps in float what QAT kept in float, so the int8 model computes what the
fake-quant model simulated.

The converted program holds quantize/dequantize ops around float kernels: run eagerly (``program.module()``) it is
correct but 1.5-6x *slower* than fp32; ``compile_int8`` lowers it with Inductor (``freezing=True``) to the real
int8 kernels. torchao is imported lazily (only when converting).

Modules: ``.pipeline`` (``convert_to_int8``), ``.export`` (export with dynamic shapes, ``input_shapes``,
``check_exportable``), ``.observers`` (calibration observers), ``.quantizer`` (the x86 quantizer per mode),
``.embedding`` (``Int8Embedding``) and ``.artifact`` (``Int8Model``, ``QuantizedModule``, save,
load, size, compile, ``quantized_layers``). Everything public is re-exported here.
"""

from lightning_compress.engine.convert.artifact import (
    SHAPES_FILE,
    SIGNATURE_FILE,
    ArgSpec,
    Int8Model,
    QuantizedModule,
    call_signature,
    compile_int8,
    int8_weights,
    load_int8,
    load_quantized,
    model_size_bytes,
    quantized_layers,
    save_and_size,
    save_int8,
)
from lightning_compress.engine.convert.embedding import Int8Embedding
from lightning_compress.engine.convert.export import Int8ConversionError, check_exportable, input_shapes
from lightning_compress.engine.convert.pipeline import ModelCall, convert_to_int8

__all__ = [
    "SHAPES_FILE",
    "SIGNATURE_FILE",
    "ArgSpec",
    "Int8ConversionError",
    "Int8Embedding",
    "Int8Model",
    "ModelCall",
    "QuantizedModule",
    "call_signature",
    "check_exportable",
    "compile_int8",
    "convert_to_int8",
    "input_shapes",
    "int8_weights",
    "load_int8",
    "load_quantized",
    "model_size_bytes",
    "quantized_layers",
    "save_and_size",
    "save_int8",
]
