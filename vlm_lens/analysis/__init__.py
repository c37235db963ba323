"""Image-aware analysis tools that work through ``run_with_hooks`` on any HookedVLM.

The experiments of Neo et al. (2024): logit lens on visual tokens, visual-token ablation,
attention knockout and activation patching, plus an evaluation harness to score them.
"""

from vlm_lens.analysis.ablation import (
    embed_ablation_hooks,
    image_ablation_hooks,
    load_mean,
    mean_visual_token,
    save_mean,
)
from vlm_lens.analysis.attribution import image_token_attribution, logit_target, top_attributed_positions
from vlm_lens.analysis.evaluate import (
    EvalResult,
    answer_positions,
    answer_token,
    answer_tokens,
    compare,
    evaluate,
)
from vlm_lens.analysis.knockout import PAPER_WINDOWS, knockout_hooks, layer_window, sliding_windows
from vlm_lens.analysis.logit_lens import LogitLensResult, hit_rate, logit_lens
from vlm_lens.analysis.patching import (
    GridPatchingResult,
    answer_prob_metric,
    logit_diff_metric,
    normalised,
    patch_image_positions,
)
from vlm_lens.analysis.positions import (
    background_positions,
    dilate,
    high_norm_positions,
    object_positions,
    random_image_positions,
    vision_positions,
)

__all__ = [
    "EvalResult", "GridPatchingResult", "LogitLensResult", "PAPER_WINDOWS", "answer_positions", "answer_prob_metric", "answer_token",
    "answer_tokens", "background_positions",
    "compare", "dilate", "embed_ablation_hooks", "evaluate", "high_norm_positions", "hit_rate",
    "image_ablation_hooks", "image_token_attribution", "knockout_hooks", "layer_window", "load_mean",
    "logit_diff_metric", "logit_lens", "logit_target", "mean_visual_token", "normalised", "object_positions",
    "patch_image_positions", "random_image_positions", "save_mean", "sliding_windows", "top_attributed_positions",
    "vision_positions",
]
