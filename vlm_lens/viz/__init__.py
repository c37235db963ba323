"""Views of a VLM's internals: circuitsvis attention views, heatmaps over the image, a logit-lens page.

Imported on demand (``from vlm_lens import viz``); nothing in ``vlm_lens`` imports it, and matplotlib and
circuitsvis are imported only inside the functions that draw.

Example:
    >>> from vlm_lens import viz
    >>> inputs = model.prepare("USER: what colour is the square ?\\n<image> ASSISTANT:", images=[img])
    >>> heads = viz.attention_heads(model, inputs, layer=1, collapse_image=True)  # shown inline in notebooks
    >>> grid = viz.attention_to_image(model, inputs)
    >>> grid.shape  # [rows, cols]
    torch.Size([3, 3])
    >>> fig = viz.image_heatmap(viz.pixels_to_image(model, inputs.pixel_values[0]), grid)
"""

from vlm_lens.viz.attention import attention_heads, attention_patterns, attention_view_data
from vlm_lens.viz.image import attention_to_image, image_grid, image_heatmap, pixels_to_image, save_figure
from vlm_lens.viz.logit_lens import logit_lens_page, save_html

__all__ = [
    "attention_heads",
    "attention_patterns",
    "attention_to_image",
    "attention_view_data",
    "image_grid",
    "image_heatmap",
    "logit_lens_page",
    "pixels_to_image",
    "save_figure",
    "save_html",
]
