"""gradcam: show why a vision network decided what it did.

Three lines from Python::

    from gradcam_cli import classify, load_model
    model = load_model("resnet50")
    records = list(classify(model, ["samples/chelsea.png"], topk=3))

The names below are imported on first use, so that the `gradcam` command (which lives in
this package) can answer `--help` without loading torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GradcamError": "errors", "InputError": "errors", "UsageError": "errors",
    "Explanation": "explanation", "explain": "explanation", "explain_layers": "explanation",
    "DEFAULT_METHODS": "methods", "METHODS": "methods",
    "ARCHITECTURES": "models", "LoadedModel": "models", "load_model": "models",
    "classify": "pipeline", "compare_layers": "pipeline", "evaluate": "evaluation",
    "explain_images": "outputs.notebook",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> object:
    """Import a public name from its module the first time it is asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gradcam_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
