"""PaliGemma's projector, hooked; the tower is Gemma 3's (SigLIP plus its final norm, because PaliGemma too
reads SigLIP's ``last_hidden_state``, which is normed).

transformers 5.24's ``PaliGemmaModel.get_image_features`` projects the normed tower output with one linear
layer and no scaling: the 1/sqrt(d_model) of older versions is gone, since the sqrt(d_model) embedding scale
now sits inside the text embedding module and no longer touches the image embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint


class PaliGemmaProjector(nn.Module):
    """``x @ W + b`` (``multi_modal_projector.linear``).

    Hooks: ``projector.hook_in`` [n_images, n_patches, d_vision] (the image features) and ``projector.hook_out``
    [n_images, n_patches, d_model]. There is no hidden layer, so no ``projector.hook_hidden``.
    """

    def __init__(self, d_vision: int, d_model: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.W = nn.Parameter(torch.empty(d_vision, d_model, dtype=dtype))
        self.b = nn.Parameter(torch.empty(d_model, dtype=dtype))
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, features: Float[torch.Tensor, "n_images n_patches d_vision"]
                ) -> Float[torch.Tensor, "n_images n_patches d_model"]:
        x = self.hook_in(features.to(self.W.dtype))
        return self.hook_out(F.linear(x, self.W.T, self.b))  # HF's nn.Linear call: one rounding in half precision
