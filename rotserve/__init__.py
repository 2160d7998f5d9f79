"""rotserve: steer a chat model by rotating its activations inside a 2D refusal plane.

The public entry points, one per piece of the pipeline:
    rotserve.plane      Plane, load_plane                 the artifact
    rotserve.rotation   rotate, angle_table               the math
    rotserve.prompts    load_prompts                      the instructions
    rotserve.scoring    is_refusal, fluency               the judgement
    rotserve.hf         HFRotatedGenerator                the reference generator (HF hooks)

Importing rotserve stays light: vLLM and Ray are imported only by the pieces that need them.
"""

from rotserve._version import __version__
from rotserve.plane import Plane, PlaneError, PlaneMeta, load_plane
from rotserve.rotation import angle_table, rotate

__all__ = [
    "Plane",
    "PlaneError",
    "PlaneMeta",
    "__version__",
    "angle_table",
    "load_plane",
    "rotate",
]
