"""HookedVLM: a TransformerLens ``HookedTransformer`` that also owns a hooked vision tower and projector.

Wiring: pixels -> ``vision`` -> ``hook_image_features`` -> ``projector`` -> ``hook_image_embeds`` ->
written over the image-token positions by ``embed`` -> ``hook_embed`` -> the language model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

import vlm_lens._compat  # noqa: F401  (silences TL's HookedTransformer deprecation, once)
from vlm_lens._memory import cpu_bytes, keep_cache_memory
from vlm_lens.config import VLMConfig
from vlm_lens.embed import MergingEmbed
from vlm_lens.image_pipeline import build_pipeline
from vlm_lens.inputs import VLMInputs
from vlm_lens.projector import LlavaProjector
from vlm_lens.vision import build_vision_tower

if TYPE_CHECKING:
    from vlm_lens.inputs import ImageLayout


class HookedVLM(HookedTransformer):
    """A vision-language model with TransformerLens hooks on every visual token.

    Example:
        >>> from vlm_lens import HookedVLM
        >>> model = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
        >>> inputs = model.prepare("USER: <image>\\nWhat is this? ASSISTANT:", images=[img])  # doctest: +SKIP
        >>> logits, cache = model.run_with_cache(inputs)  # doctest: +SKIP
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        vlm_cfg: VLMConfig,
        tokenizer: Any = None,
        processor: Any = None,
        move_to_device: bool = True,
        default_padding_side: str | None = None,
    ):
        super().__init__(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side=default_padding_side)
        self.vlm_cfg = vlm_cfg
        self.processor = processor
        self.embed = MergingEmbed(self.cfg)
        self.vision = build_vision_tower(vlm_cfg, dtype=self.cfg.dtype)
        self.hook_image_features = HookPoint()  # [n_images, n_image_tokens, d_features]
        self.projector = LlavaProjector(vlm_cfg, self.cfg.d_model, dtype=self.cfg.dtype)
        self.hook_image_embeds = HookPoint()  # [n_images, n_image_tokens, d_model] or [total_tokens, d_model]
        if vlm_cfg.image_newline:
            self.image_newline = torch.nn.Parameter(torch.empty(self.cfg.d_model, dtype=self.cfg.dtype))
        self.pipeline = build_pipeline(vlm_cfg.pipeline)
        self.pipeline.install(self)  # an architecture's own modules (e.g. another projector), before hooks exist
        self._generation_images: tuple[torch.Tensor, torch.Tensor] | None = None
        if move_to_device:
            self.to(self.cfg.device)
        from vlm_lens.fast import install_fast_components  # same hooks, no per-forward weight copies

        install_fast_components(self)
        self.setup()

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_name: str, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, fold_ln: bool = True,
                        center_writing_weights: bool = True, center_unembed: bool = True,
                        fold_value_biases: bool = True, allow_pickle: bool = False,
                        **hf_kwargs: Any) -> HookedVLM:
        """Load a Hugging Face checkpoint (hub id or local folder), processing weights as
        TransformerLens does (fold_ln, center_writing_weights, center_unembed, fold_value_biases).

        Only safetensors are read unless ``allow_pickle=True``; ``trust_remote_code`` is never used.
        """
        from vlm_lens.loading import load_pretrained

        processing = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                          center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        return load_pretrained(cls, model_name, device=device, dtype=dtype, processing=processing,
                               allow_pickle=allow_pickle, **hf_kwargs)

    @classmethod
    def from_pretrained_no_processing(cls, model_name: str, **kwargs: Any) -> HookedVLM:
        """Like ``from_pretrained`` with raw weights: residuals equal the HF hidden states."""
        return cls.from_pretrained(model_name, fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False, **kwargs)

    @classmethod
    def from_hf(cls, hf_model: Any, processor: Any = None, *, processing: bool = False,
                device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> HookedVLM:
        """Wrap an in-memory HF model (its weights are copied only where the layout changes).

        Weights are raw by default (``processing=False``), so the cache equals HF hidden states.
        """
        from vlm_lens.loading import build_from_hf

        steps = dict(fold_ln=processing, center_writing_weights=processing, center_unembed=processing,
                     fold_value_biases=processing)
        return build_from_hf(cls, hf_model, processor, processing=steps, device=device, dtype=dtype)

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
        super().set_use_split_qkv_input(use_split_qkv_input)
        self.vision.cfg.use_split_qkv_input = use_split_qkv_input

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        super().set_use_hook_mlp_in(use_hook_mlp_in)
        self.vision.cfg.use_hook_mlp_in = use_hook_mlp_in

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        super().set_use_attn_in(use_attn_in)
        self.vision.cfg.use_attn_in = use_attn_in

    # ----------------------------------------------------------------------------------- images
    @property
    def image_token_id(self) -> int:
        return self.vlm_cfg.image_token_id

    def encode_images(self, pixel_values: torch.Tensor, **extras: Any) -> Float[torch.Tensor, "total_image_tokens d_model"]:
        """Vision tower -> ``hook_image_features`` -> projector -> ``hook_image_embeds``, flattened in
        sequence order (``extras``: per-architecture inputs such as ``image_sizes``)."""
        self.pipeline.check(self, pixel_values, extras)
        return self.pipeline.encode(self, pixel_values, extras)

    def _check_image_inputs(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None,
                            extras: dict[str, Any] | None = None) -> torch.Tensor:
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
            return image_mask
        if not torch.is_tensor(pixel_values):
            raise ValueError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}.")
        per_image = self.pipeline.check(self, pixel_values, extras or {})
        n_features = sum(per_image)
        if n_tokens == 0:
            raise ValueError(
                f"pixel_values for {pixel_values.shape[0]} image(s) were given but the tokens contain no "
                f"image token (id {self.image_token_id}). Put the image placeholder in the prompt and "
                "expand it with model.prepare(prompt, images=[...])."
            )
        if n_tokens != n_features:
            raise ValueError(
                f"The tokens contain {n_tokens} image tokens but {len(per_image)} image(s) give "
                f"{n_features} image features ({', '.join(map(str, per_image))} per image). Each image needs "
                "exactly that many image tokens; use model.prepare(...) to expand placeholders."
            )
        return image_mask

    # ----------------------------------------------------------------------------------- forward
    def forward(self, input: Any, *args: Any, pixel_values: torch.Tensor | None = None,
                **kwargs: Any) -> Any:
        """HookedTransformer's forward, with images.

        ``input`` is a ``VLMInputs`` (from ``model.prepare``), or tokens with the image tokens already
        expanded plus ``pixel_values``; strings and text-only tokens work as in TransformerLens.
        """
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
                    f"start_at_layer is not supported for {self.vlm_cfg.architecture}: its rotary positions are "
                    "computed from the whole input. Patch the residual with a hook on "
                    "blocks.{l}.hook_resid_pre instead."
                )
            return super().forward(input, *args, **kwargs)
        if isinstance(input, (str, list)):
            input = self.to_tokens(input)
        tokens = input if input.ndim == 2 else input[None]
        past_kv_cache = kwargs.get("past_kv_cache")
        mask, embeds = self._image_merge(tokens, pixel_values, past_kv_cache, extras)
        context = self.pipeline.forward_context(self, tokens, mask, kwargs.get("attention_mask"), past_kv_cache,
                                                extras)
        with self.embed.merging(mask, embeds), context:
            return super().forward(tokens, *args, **kwargs)

    def _image_merge(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None, past_kv_cache: Any,
                     extras: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self._generation_images is not None and pixel_values is None:
            # Inside generate(): the prompt's images go in wherever the call covers the prompt.
            prompt_mask, embeds = self._generation_images
            starts_at_zero = past_kv_cache is None or past_kv_cache[0].past_keys.shape[1] == 0
            return (prompt_mask, embeds) if starts_at_zero else (None, None)
        image_mask = self._check_image_inputs(tokens, pixel_values, extras)
        if pixel_values is None:
            return None, None
        return image_mask, self.pipeline.encode(self, pixel_values, extras)

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

    def layout(self, inputs: VLMInputs) -> ImageLayout:
        return inputs.layout

    def run_with_cache(self, *model_args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """TransformerLens's ``run_with_cache``; on CPU the cache's memory is reused by the next call.

        With glibc's default settings a dropped cache's memory goes back to the operating system and
        the next call faults it in again; see ``vlm_lens.reuse_cache_memory`` to turn the reuse off.
        """
        out, cache = super().run_with_cache(*model_args, **kwargs)
        keep_cache_memory(cpu_bytes(cache.values()))
        return out, cache

    @torch.inference_mode()
    def generate(self, input: Any = "", max_new_tokens: int = 10, **kwargs: Any) -> Any:  # type: ignore[override]
        """Greedy (default) or sampled generation with images; see ``vlm_lens.generation``."""
        from vlm_lens.generation import generate

        return generate(self, input, max_new_tokens=max_new_tokens, **kwargs)


Tokens = Int[torch.Tensor, "batch pos"]
