"""incontext: in-context (few-shot) image segmentation behind one episode interface.

>>> import incontext
>>> model = incontext.build("prototype")
>>> pred = model.segment("query.jpg", [("support.jpg", "support.png")])
>>> pred.mask.shape  # the query's original (H, W)
"""

from incontext.episode import Context, Episode, Instance, Prediction, Support
from incontext.errors import InputError, WeightsNotFoundError
from incontext.pipeline import BinaryResult, Pipeline, Segmenter
from incontext.registry import available, build

__all__ = [
    "BinaryResult",
    "Context",
    "Episode",
    "InputError",
    "Instance",
    "Pipeline",
    "Prediction",
    "Segmenter",
    "Support",
    "WeightsNotFoundError",
    "available",
    "build",
]
__version__ = "0.1.0"
