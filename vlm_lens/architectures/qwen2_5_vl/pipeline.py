"""Qwen2.5-VL image pipeline (``"qwen2_5_vl"``): images of any size, one merged-token grid each.

Every image arrives as the processor's patches plus its row of ``image_grid_thw`` = (1, h, w) patches; it
takes ``h/2 * w/2`` consecutive image tokens (merge 2), row-major over its merged grid, which the
processor and chat template put between ``<|vision_start|>`` and ``<|vision_end|>``.

- ``encode``: vision tower -> ``hook_image_features`` -> patch merger (``projector``) ->
  ``hook_image_embeds`` [total_image_tokens, d_model] in sequence order.
- ``layout``: per image its merged ``grid`` [h/2, w/2], the ``markers`` (the positions just before and
  after the image, where Qwen's prompt format has ``<|vision_start|>``/``<|vision_end|>``: the layout
  sees the image mask, not the token ids, so hand-made tokens must follow that format), and ``boxes`` (the
  region of the original image behind each token) when the original sizes are known (``image_sizes``, added
  by ``Qwen2_5_VLImageProcessor``).
- ``positions``: the 3-D rotary position ids of the call (``mrope``). Inside ``generate`` the positions of
  the cached keys come from the previous step, and new tokens continue from the largest position so far,
  as transformers' ``rope_deltas`` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformer_lens.components import GroupedQueryAttention
from transformer_lens.utilities.tokenize_utils import get_attention_mask

from vlm_lens._tl.components import with_external_rotary
from vlm_lens._tl.kv_cache import cached_length
from vlm_lens.architectures.qwen2_5_vl.merger import PatchMerger
from vlm_lens.architectures.qwen2_5_vl.mrope import MRopePositions, mrope_rotary, rope_index
from vlm_lens.architectures.qwen2_5_vl.vision import HookedQwen2_5_VLVision
from vlm_lens.layout import ImageLayout, ImageSpan, split_image_tokens
from vlm_lens.pipeline import ImagePipeline, ImagePlan

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


def image_grids(extras: dict[str, Any]) -> torch.Tensor:
    """``image_grid_thw`` from ``extras`` as a [n_images, 3] LongTensor, checked."""
    grids = extras.get("image_grid_thw")
    if grids is None:
        raise ValueError("This model needs image_grid_thw (each image's (t, h, w) patch grid): pass image_grid_thw=... "
                         "with tokens and pixel_values, or build inputs with model.prepare(prompt, images=[...]).")
    grids = torch.as_tensor(grids).long().cpu()
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise ValueError(f"image_grid_thw has shape {tuple(grids.shape)}; expected [n_images, 3] rows of (t, h, w).")
    return grids


def token_boxes(grid_thw: torch.Tensor, size: tuple[int, int], patch: int, merge: int) -> torch.Tensor:
    """[n_tokens, 4] (top, left, bottom, right) in original pixels: the processor resizes the whole image
    (no crop, no padding) to ``h * patch`` x ``w * patch`` px, and token (r, c) covers ``merge`` patches a side."""
    _, h, w = (int(v) for v in grid_thw)
    step_y, step_x = merge * patch * size[0] / (h * patch), merge * patch * size[1] / (w * patch)
    rows, cols = torch.meshgrid(torch.arange(h // merge, dtype=torch.float64),
                                torch.arange(w // merge, dtype=torch.float64), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return torch.stack([rows * step_y, cols * step_x, (rows + 1) * step_y, (cols + 1) * step_x], dim=1)


class Qwen2_5_VLPipeline(ImagePipeline):
    """Dynamic resolution, windowed vision, 2x2 patch merger and multimodal rotary positions."""

    extra_keys: tuple[str, ...] = ("image_grid_thw",)
    supports_start_at_layer = False
    vision_class: type[HookedQwen2_5_VLVision] = HookedQwen2_5_VLVision  # Qwen2-VL's pipeline swaps the tower

    def build(self, model: HookedVLM) -> None:
        """The tower, the patch merger as the projector, and M-RoPE in every language-model attention layer."""
        model.vision = self.vision_class(model.vlm_cfg, dtype=model.cfg.dtype)
        model.projector = PatchMerger(model.vlm_cfg, model.cfg.d_model, model.vision.cfg)
        for i, block in enumerate(model.blocks):
            if not isinstance(block.attn, GroupedQueryAttention):
                raise ValueError(f"blocks.{i}.attn is a {type(block.attn).__name__}; M-RoPE needs TransformerLens's "
                                 "GroupedQueryAttention (a Qwen2 language model).")
            with_external_rotary(block.attn, mrope_rotary)

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        grids = image_grids(extras)
        m = model.vlm_cfg.vision.spatial_merge_size
        bad = [tuple(g) for g in grids.tolist() if g[0] != 1 or g[1] % m or g[2] % m]
        if bad:
            raise ValueError(f"image_grid_thw rows {bad} are not (1, h, w) with h and w multiples of {m}: vlm_lens "
                             "feeds still images only. Use the checkpoint's image processor (model.prepare).")
        expected = (int(grids.prod(-1).sum()), model.vision.patch_dim)
        if pixel_values.ndim != 2 or tuple(pixel_values.shape) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, but image_grid_thw {grids.tolist()} describes "
                f"{expected[0]} patches of {expected[1]} values: pass the processor's flat [n_patches, "
                "channels * temporal_patch * patch * patch] pixel_values with image_grid_thw from the same call.")
        return ImagePlan(tuple(int(g.prod()) // m**2 for g in grids), grids)

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        return model.vision(pixel_values.to(model.cfg.device), plan.detail.to(model.cfg.device))

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        if not image_mask.any():
            return ImageLayout(())
        grids, vcfg = image_grids(extras), model.vlm_cfg.vision
        m = vcfg.spatial_merge_size
        sizes = extras.get("image_sizes")
        sizes = None if sizes is None else [tuple(int(v) for v in s) for s in torch.as_tensor(sizes).tolist()]
        if sizes is not None and len(sizes) != len(grids):
            raise ValueError(f"image_sizes has {len(sizes)} rows but image_grid_thw {len(grids)}; pass both from "
                             "the same processor call.")
        shapes = [(int(g[1]) // m, int(g[2]) // m) for g in grids]
        spans = [self._span(model, image_mask[b], b, chunk, shapes[k], grids[k], None if sizes is None else sizes[k])
                 for b, k, chunk in split_image_tokens(image_mask, [r * c for r, c in shapes], "image_grid_thw",
                                                       lambda k: f"grid {grids[k].tolist()}")]
        return ImageLayout(tuple(spans))

    @staticmethod
    def _span(model: HookedVLM, row_mask: torch.Tensor, batch: int, chunk: torch.Tensor, shape: tuple[int, int],
              grid_thw: torch.Tensor, size: tuple[int, int] | None) -> ImageSpan:
        start, end = int(chunk[0]), int(chunk[-1]) + 1
        markers = []
        if model.vlm_cfg.vision_start_token_id is not None:
            markers = [p for p in (start - 1, end) if 0 <= p < len(row_mask) and not bool(row_mask[p])]
        vcfg = model.vlm_cfg.vision
        boxes = None if size is None else token_boxes(grid_thw, size, vcfg.patch_size, vcfg.spatial_merge_size)
        return ImageSpan(batch=batch, start=start, end=end, grid=chunk.reshape(shape),
                         markers=torch.tensor(markers, dtype=torch.long), boxes=boxes)

    def positions(self, model: HookedVLM, tokens: torch.Tensor, image_mask: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, past_kv_cache: Any, history: Any,
                  extras: dict[str, Any]) -> MRopePositions:
        tokenizer = model.tokenizer
        if attention_mask is None and (past_kv_cache is not None or getattr(tokenizer, "padding_side", None) == "left"):
            # TransformerLens builds this mask itself in these cases; positions must skip the same tokens.
            attention_mask = get_attention_mask(tokenizer, tokens, model.cfg.default_prepend_bos)
        is_image = torch.zeros(tokens.shape, dtype=torch.bool)
        if image_mask is not None:  # generation without a KV cache: the tokens after the prompt are text
            is_image[:, :image_mask.shape[1]] = image_mask.cpu()
        grids = image_grids(extras) if is_image.any() else None
        ids = rope_index(is_image, model.vlm_cfg.vision.spatial_merge_size, grids, attention_mask)
        past = cached_length(past_kv_cache)
        if past:
            if not isinstance(history, MRopePositions) or history.ids.shape[-1] != past:
                raise ValueError(
                    "A KV cache with M-RoPE needs the positions of its cached keys, which vlm_lens keeps inside "
                    "model.generate only. Use model.generate, or run the whole sequence without past_kv_cache.")
            old = history.ids.cpu()
            ids = torch.cat([old, ids + old.amax(dim=(0, 2))[None, :, None] + 1], dim=-1)
        cfg = model.cfg
        return MRopePositions.of(ids.to(cfg.device), cfg.d_head, cfg.rotary_base, model.vlm_cfg.mrope_section,
                                 cfg.dtype)
