"""Extract the steering plane from activation statistics: no text is generated.

    result = extract_plane(model="data/toy-refusal", out="plane.safetensors")
    print(result.summary())

The plane file carries the method, the evidence table and the data hashes; beside it go
<stem>.candidates.json/.csv (every candidate's statistics) and <stem>.candidates.png.

Where things are:

- config.py      ExtractConfig: every choice of an extraction, and the CLI's defaults
- pipeline.py    extract_plane / extract_from_loaded: the passes over the prompts, b1, b2
- candidates.py  the statistics (pure math: sites, candidates, AUROC, Cohen's d)
- first_axis.py  the --select rules for b1, one registered function each
- second_axis.py the --second methods for b2, one registered function each
- activations.py reading the residual stream at every site (batched forward passes)
- inputs.py      prompt files, chat template, the provenance recorded in the plane
- result.py      ExtractionResult and its text summary
- outputs.py     writing the plane, candidates .json/.csv, figure; repo-relative paths
- figure.py      the candidates figure
- cli.py         `rotserve extract` / `python jobs/extract.py`
"""

from __future__ import annotations

from rotserve.extract.candidates import ExtractionError
from rotserve.extract.config import ExtractConfig
from rotserve.extract.outputs import display_path, side_paths, write_outputs
from rotserve.extract.pipeline import extract_from_loaded, extract_plane, split_prompts
from rotserve.extract.result import ExtractionResult

__all__ = [
    "ExtractConfig",
    "ExtractionError",
    "ExtractionResult",
    "display_path",
    "extract_from_loaded",
    "extract_plane",
    "side_paths",
    "split_prompts",
    "write_outputs",
]
