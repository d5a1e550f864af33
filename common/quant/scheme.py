"""One interface for weight (and activation) quantization schemes, and the registry of them.

A scheme quantizes a float model in place (optionally from calibration data), names the ops
its modules call (common/ops dispatch names), and saves/loads a quantized checkpoint as a
state dict with Hugging Face-style names plus a `quantization_config` dict (what goes into
config.json), so a quantized model can be written once and read back without the float one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from torch import Tensor, nn

from common.core.errors import RecipeError
from common.quant.calibrated import AWQ, GPTQ
from common.quant.formats import WeightFormat
from common.quant.int4 import Int4WeightOnly
from common.quant.int8 import Int8WeightOnly
from common.quant.w4a8 import W4A8
from common.quant.w8a8 import W8A8


class QuantScheme(Protocol):
    name: str  # the quant.weights value that selects it
    kernels: tuple[str, ...]  # ops (common/ops/dispatch.py) its modules call

    def quantize(
        self,
        model: nn.Module,
        calibration: Iterable[Any] | None = None,
        skip: Callable[[str, nn.Module], bool] | None = None,
    ) -> nn.Module:
        """Replace modules by quantized ones, in place, except those skip(name, module) keeps
        in float; returns the model. Schemes with `calibrated = True` get the layer-wise walk
        (common/transforms/calibrate.py) as calibration."""
        ...

    def weight_format(self) -> WeightFormat:
        """How it stores a weight matrix (common/quant/formats.py): what the memory model counts."""
        ...

    def quantization_config(self) -> dict[str, Any]:
        """What a checkpoint records to be read back with this scheme (key "scheme": name)."""
        ...

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The quantized model's tensors under checkpoint names, each shared tensor once."""
        ...

    def load_state_dict(
        self, model: nn.Module, state: dict[str, Tensor], config: dict[str, Any]
    ) -> nn.Module:
        """Turn a float model of the same architecture into the saved quantized one."""
        ...


SCHEMES: dict[str, QuantScheme] = {
    s.name: s for s in (Int8WeightOnly(), W8A8(), Int4WeightOnly(), W4A8(), GPTQ(), AWQ())
}


def get_scheme(name: str) -> QuantScheme:
    if name not in SCHEMES:
        raise RecipeError(
            f"unknown quantization scheme {name!r}; choose none or {', '.join(SCHEMES)}"
        )
    return SCHEMES[name]


def configured_scheme(quant: Any) -> QuantScheme:
    """The scheme quant.weights names, with its options from the quant section (group size,
    bits, ...) when it has any (a scheme's optional `configured(quant)`)."""
    scheme = get_scheme(quant.weights)
    configure = getattr(scheme, "configured", None)
    return configure(quant) if configure else scheme
