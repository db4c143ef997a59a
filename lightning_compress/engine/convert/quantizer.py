"""The ``X86InductorQuantizer`` set up for each conversion mode and observer (torchao imported lazily)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

from lightning_compress.engine.convert.observers import _percentile_observer_type
from lightning_compress.engine.fake_quant import ACTIVATION_EPS


def _import_torchao() -> None:
    """Import the torchao pt2e modules once, hiding the DeprecationWarnings torch's own mkldnn module emits then."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import torchao.quantization.pt2e.quantize_pt2e
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401


def _quantizer(mode: str, skip: Sequence[str], observer: str, percentile: float) -> Any:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import observer as obs
    from torchao.quantization.pt2e.quantizer import QuantizationConfig

    if mode == "static":
        config = xiq.get_default_x86_inductor_quantization_config()
        if observer != "histogram_l2":  # the default config's activation observer is torchao's histogram one
            if observer == "histogram":
                ctr = _percentile_observer_type().with_args(eps=ACTIVATION_EPS, percentile=percentile)
            else:
                kind = obs.MinMaxObserver if observer == "minmax" else obs.MovingAverageMinMaxObserver
                ctr = kind.with_args(eps=ACTIVATION_EPS)
            act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=ctr)
            config = QuantizationConfig(act, act, config.weight, config.bias, config.is_qat)
    elif mode == "dynamic":
        config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=True)
    else:
        base = xiq.get_default_x86_inductor_quantization_config()
        config = QuantizationConfig(None, None, base.weight, None, False)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(config)
    for name in skip:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer
