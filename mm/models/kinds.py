"""`of(config)`: the `mm.models.protocol.ModelKind` of a model config - the one place that maps config types
to model kinds (`LLMConfig`, `LLaVAConfig`, `IAAConfig`, `VLMConfig`)."""

from __future__ import annotations

from typing import Any

from mm.config import IAAConfig, LLaVAConfig, LLMConfig, VLMConfig
from mm.models import iaa, llava, llm, vlm
from mm.models.protocol import ModelKind

_KINDS: dict[type, Any] = {
    LLMConfig: llm.LLMKind,
    LLaVAConfig: llava.LLaVAKind,
    IAAConfig: iaa.IAAKind,
    VLMConfig: lambda config: vlm.VLMKind(config, of(config.lm)),
}


def of(config: Any) -> ModelKind:
    try:
        make = _KINDS[type(config)]
    except KeyError:
        raise TypeError(f"no model kind for a {type(config).__name__}; have {[t.__name__ for t in _KINDS]}") from None
    return make(config)
