"""Every choice of an extraction, in one dataclass: the CLI's flags and defaults come from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from rotserve.dtype import DTYPES
from rotserve.extract.activations import POSITIONS
from rotserve.extract.candidates import HARMFUL, HARMLESS, ExtractionError
from rotserve.extract.first_axis import SELECT_RULES
from rotserve.extract.second_axis import SECOND_METHODS
from rotserve.paths import default_prompts, toy_model_dir
from rotserve.steering import WindowError, canonical_window


# The embedded defaults are looked up when a config is made, not at import, so a
# ROTSERVE_DATA_DIR set later (a test, a long-lived process) is honoured.
def _toy_model() -> str:
    return str(toy_model_dir())


def _harmful_prompts() -> str:
    return str(default_prompts()[HARMFUL])


def _harmless_prompts() -> str:
    return str(default_prompts()[HARMLESS])


@dataclass
class ExtractConfig:
    """Every choice of an extraction; the CLI flags map one to one onto these fields."""

    model: str = field(default_factory=_toy_model)  # HF id or local directory
    harmful: str = field(default_factory=_harmful_prompts)  # prompt file the model should refuse
    harmless: str = field(default_factory=_harmless_prompts)  # prompt file it should answer
    column: str | None = None  # instruction column; None: the first known name found
    limit: int | None = None  # first N prompts of each file
    out: str | None = "plane.safetensors"  # None writes nothing
    select: str = "max_sim"  # how b1 is chosen: a key of SELECT_RULES
    second: str = "pca"  # how b2 is chosen: a key of SECOND_METHODS
    random_b1: bool = False  # the full control: b1 random too (needs second="random")
    layers: str | None = None  # layer window restricting the candidates; None: every layer
    positions: str = "last"  # which token positions are read: one of POSITIONS
    holdout: float = 0.25  # fraction of each class held out for the separability statistics
    seed: int = 0  # of the held-out split and of random directions
    batch_size: int = 16
    device: str = "cpu"
    # of the model weights (auto: rotserve.dtype.choose_dtype); the statistics are float32/64
    dtype: str = "float32"
    chat_template: str | None = None  # path of a Jinja file
    trust_remote_code: bool = False
    figure: bool = True  # write <stem>.candidates.png beside the plane
    # Also write the standard controls beside the plane (<stem>.ctrl-<name>.safetensors).
    controls: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise ExtractionError naming the flag to change, before any model is loaded."""
        if self.select not in SELECT_RULES:
            raise ExtractionError(f"--select must be one of {', '.join(SELECT_RULES)}")
        if self.second not in SECOND_METHODS:
            raise ExtractionError(f"--second must be one of {', '.join(SECOND_METHODS)}")
        if self.positions not in POSITIONS:
            raise ExtractionError(f"--positions must be one of {', '.join(POSITIONS)}")
        if not 0.0 <= self.holdout < 1.0:
            raise ExtractionError(f"--holdout must be in [0, 1), got {self.holdout}")
        if SELECT_RULES[self.select].needs_holdout and self.holdout <= 0:
            raise ExtractionError(
                f"--select {self.select} needs held-out prompts: set --holdout > 0"
            )
        if self.layers is not None:
            try:  # the grammar now; the layers themselves once the model's depth is known
                canonical_window(self.layers, "--layers")
            except WindowError as e:
                raise ExtractionError(str(e)) from None
        if self.dtype not in DTYPES:
            raise ExtractionError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ExtractionError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.random_b1 and self.second != "random":
            raise ExtractionError(
                "--random-b1 is the full control: b2 is random too; drop --second or pass "
                "--second random"
            )
