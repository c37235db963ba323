"""Keys and values of visual tokens (Liu et al., 2025, "Visual Representations inside the Language Model").

- ``read_kv``: per-layer image keys (before and after rotary), values, vision features and projector
  outputs on each image's patch grid, keeping only image positions.
- Probes, one score per layer: ``linear_probe_segmentation``, ``query_segmentation``,
  ``correspondence_pck``, ``cosegmentation``, ``label_propagation``.
- ``find_input_agnostic_keys`` + ``artifact_knockout``: low-variance image keys and a knockout of them.
- ``compare_prefix``: probe scores with and without a text prefix before the image.
- ``answer_probe`` + ``choice_correct`` + ``probe_output_gap``: probe vs model output.
"""

from vlm_lens.analysis.probing.artifacts import InputAgnosticKeys, artifact_knockout, find_input_agnostic_keys
from vlm_lens.analysis.probing.control import (
    GapResult,
    answer_probe,
    choice_correct,
    compare_prefix,
    pool_regions,
    prepare_batches,
    probe_output_gap,
    with_prefix,
)
from vlm_lens.analysis.probing.fit import LinearProbe, fit_logistic, kmeans
from vlm_lens.analysis.probing.metrics import iou_per_image, keypoints_from_masks, miou, pck, upsample_mask
from vlm_lens.analysis.probing.probes import (
    correspondence_pck,
    cosegmentation,
    label_propagation,
    linear_probe_segmentation,
    nearest_patches,
    propagate_labels,
    query_segmentation,
    similarity_maps,
)
from vlm_lens.analysis.probing.readout import SITES, KVReadout, iter_layers, read_kv, text_features

__all__ = [
    "GapResult", "InputAgnosticKeys", "KVReadout", "LinearProbe", "SITES", "answer_probe", "artifact_knockout",
    "choice_correct", "compare_prefix", "correspondence_pck", "cosegmentation", "find_input_agnostic_keys",
    "fit_logistic", "iou_per_image", "iter_layers", "keypoints_from_masks", "kmeans", "label_propagation",
    "linear_probe_segmentation", "miou", "nearest_patches", "pck", "pool_regions", "prepare_batches",
    "probe_output_gap", "propagate_labels", "query_segmentation", "read_kv", "similarity_maps", "text_features",
    "upsample_mask", "with_prefix",
]
