"""HookedVLM: a TransformerLens ``HookedTransformer`` that also owns a hooked vision tower and projector.

The core owns the hook skeleton; the family's ``ImagePipeline`` (``vlm_lens.pipeline``) supplies the pieces::

    pixels -> vision -> hook_image_features -> projector -> pack -> hook_image_embeds
           -> written over the image-token positions by ``embed`` -> hook_embed -> the language model
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_attention_mask

from vlm_lens import _tl
from vlm_lens._memory import cache_memory_enabled, cpu_bytes, keep_cache_memory
from vlm_lens._tl.kv_cache import cached_length
from vlm_lens.architectures.registry import get_spec
from vlm_lens.config import VLMConfig
from vlm_lens.context import CALL, CallContext, PromptImages
from vlm_lens.embed import MergingEmbed
from vlm_lens.inputs import VLMInputs
from vlm_lens.pipeline import ImagePlan


class HookedVLM(HookedTransformer):
    """A vision-language model with TransformerLens hooks on every visual token.

    Example:
        >>> from vlm_lens import organism
        >>> model = organism.load()
        >>> item = organism.ShapesDataset(split="test", seed=0, size=1)[0]
        >>> inputs = model.prepare(item.prompt, images=[item.image])
        >>> logits, cache = model.run_with_cache(inputs)
        >>> cache["hook_image_embeds"].shape == (1, 9, model.cfg.d_model)
        True
        >>> tuple(inputs.layout.grid(0).shape)
        (3, 3)
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        vlm_cfg: VLMConfig,
        tokenizer: Any = None,
        processor: Any = None,
        move_to_device: bool = True,
        default_padding_side: str | None = None,
        fast: bool | None = None,
    ):
        from vlm_lens._tl.components import shared_rotary_tables

        with shared_rotary_tables():  # one table for all layers, not one computed per layer
            super().__init__(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side=default_padding_side)
        self.vlm_cfg = vlm_cfg
        self.processor = processor
        # The checkpoint's generation_config stop and pad tokens (set by from_pretrained); generate() stops at
        # any of these, as HF's generate does, before falling back to the tokenizer's eos token.
        self.generation_eos_token_ids: tuple[int, ...] | None = None
        self.generation_pad_token_id: int | None = None
        self.embed = MergingEmbed(self.cfg)
        self.hook_image_features = HookPoint()  # what the projector reads
        self.hook_image_embeds = HookPoint()  # [n_images, n_image_tokens, d_model] or [total_tokens, d_model]
        self.pipeline = get_spec(vlm_cfg.architecture).pipeline(vlm_cfg)
        self.pipeline.build(self)  # model.vision, model.projector and the family's own modules
        if move_to_device:
            self.to(self.cfg.device)
        self.fast = _tl.resolve_fast(fast)
        if self.fast:
            from vlm_lens._tl.fast import install_fast_components  # same hooks, no per-forward weight copies

            install_fast_components(self)
        self.setup()

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_name: str, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, fold_ln: bool = True,
                        center_writing_weights: bool = True, center_unembed: bool = True,
                        fold_value_biases: bool = True, allow_pickle: bool = False, fast: bool | None = None,
                        **hf_kwargs: Any) -> HookedVLM:
        """Load a Hugging Face checkpoint (hub id or local folder), processing weights as
        TransformerLens does (fold_ln, center_writing_weights, center_unembed, fold_value_biases).

        Only safetensors are read unless ``allow_pickle=True``; ``trust_remote_code`` is never used.
        ``fast=False`` keeps TransformerLens's own components (``None``: the fast ones where the installed
        TransformerLens is in the tested range and ``VLM_LENS_FAST`` is not ``0``).
        """
        from vlm_lens.loading import load_pretrained

        processing = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                          center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        return load_pretrained(cls, model_name, device=device, dtype=dtype, processing=processing,
                               allow_pickle=allow_pickle, fast=fast, **hf_kwargs)

    @classmethod
    def from_pretrained_no_processing(cls, model_name: str, **kwargs: Any) -> HookedVLM:
        """Like ``from_pretrained`` with raw weights: residuals equal the HF hidden states."""
        return cls.from_pretrained(model_name, fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False, **kwargs)

    @classmethod
    def from_hf(cls, hf_model: Any, processor: Any = None, *, processing: bool = False,
                device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                fast: bool | None = None) -> HookedVLM:
        """Wrap an in-memory HF model (its weights are copied only where the layout changes).

        Weights are raw by default (``processing=False``), so the cache equals HF hidden states.
        """
        from vlm_lens.loading import build_from_hf

        steps = dict(fold_ln=processing, center_writing_weights=processing, center_unembed=processing,
                     fold_value_biases=processing)
        return build_from_hf(cls, hf_model, processor, processing=steps, device=device, dtype=dtype, fast=fast)

    def set_tokenizer(self, tokenizer: Any, default_padding_side: str | None = None) -> None:
        """Keep the checkpoint's own tokenizer (TransformerLens would re-load it from its name)."""
        self.tokenizer = tokenizer
        if default_padding_side is not None:
            tokenizer.padding_side = default_padding_side
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0

    def to(self, device_or_dtype: Any, print_details: bool = False) -> HookedVLM:  # type: ignore[override]
        super().to(device_or_dtype, print_details=print_details)
        if isinstance(device_or_dtype, torch.dtype):
            self.vision.cfg.dtype = device_or_dtype
        else:
            self.vision.cfg.device = str(device_or_dtype)
        return self

    # The optional TransformerLens hooks exist in the vision blocks too: switch them together.
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        super().set_use_attn_result(use_attn_result)
        self.vision.cfg.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """As TransformerLens's, in the vision tower too where its blocks split their inputs per head (a tower of
        the family's own blocks without ``hook_q_input`` keeps the flag off and its hooks)."""
        super().set_use_split_qkv_input(use_split_qkv_input)
        if self._vision_splits_inputs():
            self.vision.cfg.use_split_qkv_input = use_split_qkv_input

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        super().set_use_hook_mlp_in(use_hook_mlp_in)
        self.vision.cfg.use_hook_mlp_in = use_hook_mlp_in

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """As TransformerLens's, in the vision tower too where its blocks split their inputs per head."""
        super().set_use_attn_in(use_attn_in)
        if self._vision_splits_inputs():
            self.vision.cfg.use_attn_in = use_attn_in

    def _vision_splits_inputs(self) -> bool:
        return any(hasattr(module, "hook_q_input") for module in self.vision.modules())

    # ----------------------------------------------------------------------------------- images
    @property
    def image_token_id(self) -> int:
        return self.vlm_cfg.image_token_id

    def encode_images(self, pixel_values: torch.Tensor, **extras: Any) -> Float[torch.Tensor, "total_image_tokens d_model"]:
        """Vision tower -> ``hook_image_features`` -> projector -> ``hook_image_embeds``, flattened in
        sequence order (``extras``: per-architecture inputs such as ``image_sizes``)."""
        return self._encode(pixel_values, self.pipeline.plan(self, pixel_values, extras))

    def _encode(self, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        """The one encode path of every family: the pipeline supplies the pieces, the core fires the hooks."""
        features = self.hook_image_features(self.pipeline.features(self, pixel_values, plan))
        embeds = self.hook_image_embeds(self.pipeline.pack(self, self.projector(features), plan))
        return embeds.reshape(-1, embeds.shape[-1])

    def _check_image_inputs(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None,
                            extras: dict[str, Any] | None = None) -> tuple[torch.Tensor, ImagePlan | None]:
        """Validate before anything runs, so a bad call fires no hook and changes nothing."""
        image_mask = tokens == self.image_token_id
        n_tokens = int(image_mask.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(
                    f"The tokens contain {n_tokens} image tokens (id {self.image_token_id}) but no "
                    "pixel_values were given. Pass pixel_values=..., or build the input with "
                    "model.prepare(prompt, images=[...])."
                )
            return image_mask, None
        if not torch.is_tensor(pixel_values):
            raise ValueError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}.")
        plan = self.pipeline.plan(self, pixel_values, extras or {})
        per_image = plan.tokens_per_image
        n_features = sum(per_image)
        if n_tokens == 0:
            raise ValueError(
                f"pixel_values for {len(per_image)} image(s) were given but the tokens contain no "
                f"image token (id {self.image_token_id}). Put the image placeholder in the prompt and "
                "expand it with model.prepare(prompt, images=[...])."
            )
        if n_tokens != n_features:
            raise ValueError(
                f"The tokens contain {n_tokens} image tokens but {len(per_image)} image(s) give "
                f"{n_features} image features ({', '.join(map(str, per_image))} per image). Each image needs "
                "exactly that many image tokens; use model.prepare(...) to expand placeholders."
            )
        return image_mask, plan

    # ----------------------------------------------------------------------------------- forward
    def forward(self, input: Any, *args: Any, pixel_values: torch.Tensor | None = None,
                prompt_images: PromptImages | None = None, **kwargs: Any) -> Any:
        """HookedTransformer's forward, with images.

        ``input`` is a ``VLMInputs`` (from ``model.prepare``), or tokens with the image tokens already
        expanded plus ``pixel_values``; strings and text-only tokens work as in TransformerLens.
        ``prompt_images`` is ``generate``'s: the prompt's images, encoded once.
        """
        if kwargs.get("start_at_layer") is not None and (
                isinstance(input, (VLMInputs, str, list)) or (torch.is_tensor(input) and not input.is_floating_point())):
            raise ValueError("start_at_layer=l takes the residual stream entering block l ([batch, pos, d_model], e.g. a "
                             "cache's blocks.{l}.hook_resid_pre), not tokens or VLMInputs.")
        extras = {k: kwargs.pop(k) for k in self.pipeline.extra_keys if k in kwargs}
        if isinstance(input, VLMInputs):
            if pixel_values is not None:
                raise ValueError("Pass pixel_values inside the VLMInputs or with tokens, not both.")
            pixel_values = input.pixel_values
            extras = {k: v for k, v in input.extras.items() if k in self.pipeline.extra_keys}
            if kwargs.get("attention_mask") is None and input.needs_attention_mask:
                kwargs["attention_mask"] = input.attention_mask
            input = input.tokens
        if kwargs.get("start_at_layer") is not None:
            if not self.pipeline.supports_start_at_layer:
                raise ValueError(
                    f"start_at_layer is not supported for {self.vlm_cfg.architecture}: its rotary positions or "
                    "attention mask are computed from the whole input. Patch the residual with a hook on "
                    "blocks.{l}.hook_resid_pre instead."
                )
            return super().forward(input, *args, **kwargs)
        if isinstance(input, (str, list)):
            prepend_bos, padding_side = kwargs.get("prepend_bos"), kwargs.get("padding_side")
            input = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if padding_side is not None and kwargs.get("attention_mask") is None and self.tokenizer.pad_token_id is not None:
                # TransformerLens masks padding by the tokenizer's side only; this call padded on `padding_side`
                kwargs["attention_mask"] = get_attention_mask(
                    self.tokenizer, input, self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos,
                    padding_side=padding_side)
        tokens = input if input.ndim == 2 else input[None]
        past_kv_cache = kwargs.get("past_kv_cache")
        call = self._call_context(tokens, pixel_values, prompt_images, past_kv_cache, extras)
        call.offset = cached_length(past_kv_cache)
        call.positions = self.pipeline.positions(
            self, tokens, call.image_mask, kwargs.get("attention_mask"), past_kv_cache,
            None if prompt_images is None else prompt_images.positions, extras)
        if prompt_images is not None:
            prompt_images.positions = call.positions
        with CALL.bind(call):
            return super().forward(tokens, *args, **kwargs)

    def _call_context(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None,
                      prompt_images: PromptImages | None, past_kv_cache: Any,
                      extras: dict[str, Any]) -> CallContext:
        if prompt_images is not None:
            if pixel_values is not None:
                raise ValueError("Pass pixel_values or prompt_images, not both.")
            extras.update(prompt_images.extras)
            if not self.pipeline.splices_images:  # read by the family's modules on every step
                return CallContext(None, prompt_images.image_embeds, side_outputs=prompt_images.side_outputs)
            # Inside generate(): the prompt's images go in wherever the call covers the prompt.
            if cached_length(past_kv_cache) == 0 and prompt_images.image_embeds is not None:
                return CallContext(prompt_images.image_mask, prompt_images.image_embeds,
                                   side_outputs=prompt_images.side_outputs)
            return CallContext()
        image_mask, plan = self._check_image_inputs(tokens, pixel_values, extras)
        if plan is None:
            return CallContext()
        embeds = self._encode(pixel_values, plan)
        spliced = image_mask if self.pipeline.splices_images else None  # None: nothing written over the sequence
        return CallContext(spliced, embeds, side_outputs=plan.side_outputs)

    # ----------------------------------------------------------------------------------- inputs
    def prepare(self, prompts: str | list[str], images: Any = None, **kwargs: Any) -> VLMInputs:
        """Prompt(s) + image(s) -> ``VLMInputs`` through the checkpoint's own processor."""
        from vlm_lens.inputs import prepare_inputs

        return prepare_inputs(self, prompts, images, **kwargs)

    def to_str_tokens(self, input: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """As in TransformerLens; for a ``VLMInputs`` image tokens read like ``<img0 r3 c4>``."""
        if isinstance(input, VLMInputs):
            from vlm_lens.inputs import labelled_str_tokens

            return labelled_str_tokens(self, input)
        return super().to_str_tokens(input, *args, **kwargs)

    def run_with_cache(self, *model_args: Any, image_tokens_only: bool = False, **kwargs: Any) -> Any:  # type: ignore[override]
        """TransformerLens's ``run_with_cache`` (``names_filter``, ``device``, ``pos_slice``, ...).

        ``device="cpu"`` moves each cached tensor off the accelerator as it is made. ``pos_slice`` keeps
        those sequence positions of the language model's hooks; ``image_tokens_only=True`` keeps each row's
        image tokens, as ``[total_image_tokens, ...]`` tensors in sequence order (row by row). Both leave
        vision-side hooks whole and slice before the tensor leaves the device (layouts in
        ``vlm_lens.caching``). With ``vlm_lens.reuse_cache_memory(True)`` (off by default) a CPU cache's
        memory is kept for the next call; see ``vlm_lens.reuse_cache_memory``.
        """
        if image_tokens_only or kwargs.get("pos_slice") is not None:
            from vlm_lens.caching import run_with_filtered_cache

            out, cache = run_with_filtered_cache(self, model_args, image_tokens_only, kwargs)
        else:
            out, cache = super().run_with_cache(*model_args, **kwargs)
        if cache_memory_enabled():
            keep_cache_memory(cpu_bytes(cache.values()))
        return out, cache

    @torch.inference_mode()
    def generate(self, input: Any = "", max_new_tokens: int = 10, **kwargs: Any) -> Any:  # type: ignore[override]
        """Greedy (default) or sampled generation with images; see ``vlm_lens.generation``."""
        from vlm_lens.generation import generate

        return generate(self, input, max_new_tokens=max_new_tokens, **kwargs)
