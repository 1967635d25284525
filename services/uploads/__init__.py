"""Every uploaded part of a job, parsed and checked before the job exists, and loaded again by the worker that runs
it (service.md, Security of uploads). By format: `parts` (the entry points), `zips` (the gate every zip passes),
`npz`, `images` (image-folder zips), `weights` (safetensors), `pt2` (custom networks); `rules` holds the caps."""

from services.uploads.parts import check_data, check_model, check_part, check_splits, load_data, load_model, parse_config, parse_spec
from services.uploads.rules import PARTS, DataInfo, Limits, PartRule

__all__ = ["PARTS", "DataInfo", "Limits", "PartRule", "check_data", "check_model", "check_part", "check_splits",
           "load_data", "load_model", "parse_config", "parse_spec"]
