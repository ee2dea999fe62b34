"""gradcam: show why a vision network decided what it did.

Three lines from Python::

    from gradcam_cli import classify, load_model
    model = load_model("resnet50")
    records = list(classify(model, ["samples/chelsea.png"], topk=3))
"""

__version__ = "0.1.0"

from .errors import GradcamError, InputError, UsageError
from .explain import Explanation, explain, explain_layers
from .methods import DEFAULT_METHODS, METHODS
from .models import ARCHITECTURES, LoadedModel, load_model
from .pipeline import classify, compare_layers

__all__ = ["ARCHITECTURES", "DEFAULT_METHODS", "METHODS", "Explanation", "GradcamError", "InputError",
           "LoadedModel", "UsageError", "__version__", "classify", "compare_layers", "explain",
           "explain_layers", "load_model"]
