"""The `lmms_eval.models` entry point (pyproject.toml): lmms-eval's manifest of the model `mm`, whose class
(`mm.eval.harness_lmms.MMLMMs`) lmms-eval imports only when a run asks for it."""

from __future__ import annotations

from typing import Any


def manifest() -> Any:
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mm", simple_class_path="mm.eval.harness_lmms.MMLMMs")
