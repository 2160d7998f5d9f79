"""The steering vocabulary every backend speaks: architectures and sites, layer windows,
requests, engine settings, the plane catalog, table rows and the set-up path.
It imports no vLLM, so the HF oracle, the grid and the frontend use it where vLLM is absent.
"""

from rotserve.steering.architectures import (
    ARCHITECTURES,
    ROTATED_ARCHITECTURES,
    SITES,
    Architecture,
    UnsupportedArchitectureError,
    architecture,
    rotated_architecture,
)
from rotserve.steering.catalog import (
    CATALOG_SEPARATOR,
    TRACKER_FQCN,
    PlaneCatalog,
    ResolvedSteering,
    is_tracker_fqcn,
)
from rotserve.steering.errors import RequestSteeringError, RotServeConfigError
from rotserve.steering.request import (
    FLAT_PREFIX,
    MODES,
    REQUEST_FIELDS,
    REQUEST_KEY,
    UNSTEERED,
    RequestSteering,
    parse_request,
)
from rotserve.steering.rows import identity_rows, row_width, steering_row
from rotserve.steering.settings import (
    DEFAULT_PLANE,
    SETTINGS_KEY,
    EngineSteering,
    check_plane_name,
)
from rotserve.steering.setup import (
    ModelConfigError,
    ModelInfo,
    SteeringSetup,
    plane_options,
    prepare_steering,
    tracker_installed,
)
from rotserve.steering.table import RequestRows, RotationState, token_slots
from rotserve.steering.window import (
    WindowError,
    absolute_layers,
    canonical_window,
    layer_ranges,
    parse_window,
    window_layers,
)

__all__ = [
    "ARCHITECTURES",
    "CATALOG_SEPARATOR",
    "DEFAULT_PLANE",
    "FLAT_PREFIX",
    "MODES",
    "REQUEST_FIELDS",
    "REQUEST_KEY",
    "ROTATED_ARCHITECTURES",
    "SETTINGS_KEY",
    "SITES",
    "TRACKER_FQCN",
    "UNSTEERED",
    "Architecture",
    "EngineSteering",
    "ModelConfigError",
    "ModelInfo",
    "PlaneCatalog",
    "RequestRows",
    "RequestSteering",
    "RequestSteeringError",
    "ResolvedSteering",
    "RotServeConfigError",
    "RotationState",
    "SteeringSetup",
    "UnsupportedArchitectureError",
    "WindowError",
    "absolute_layers",
    "architecture",
    "canonical_window",
    "check_plane_name",
    "identity_rows",
    "is_tracker_fqcn",
    "layer_ranges",
    "parse_request",
    "parse_window",
    "plane_options",
    "prepare_steering",
    "rotated_architecture",
    "row_width",
    "steering_row",
    "token_slots",
    "tracker_installed",
    "window_layers",
]
