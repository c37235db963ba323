"""VLMInputs: tokens, pixels and the image layout, built from prompts and images by the HF processor."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Int

from vlm_lens.layout import ImageLayout

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


@dataclass(frozen=True)
class VLMInputs:
    """Everything one forward pass needs. Pass it wherever TransformerLens takes ``tokens``.

    Example:
        >>> inputs = model.prepare("USER: what colour is the square ?\\n<image> ASSISTANT:", images=[img])
        >>> inputs.tokens.shape, int(inputs.image_mask.sum())  # 9 of the 20 positions are image tokens
        (torch.Size([1, 20]), 9)
        >>> inputs.layout.grid(0)  # [rows, cols] sequence positions of image 0
        tensor([[ 9, 10, 11],
                [12, 13, 14],
                [15, 16, 17]])
    """

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    image_mask: Bool[torch.Tensor, "batch pos"]
    layout: ImageLayout
    pixel_values: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        """The tokens' shape, so TransformerLens utilities (e.g. patching) can size their loops."""
        return self.tokens.shape

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def needs_attention_mask(self) -> bool:
        return bool((self.attention_mask == 0).any())

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: str | torch.device) -> VLMInputs:
        def move(x: Any) -> Any:
            return x.to(device) if torch.is_tensor(x) else x

        return replace(self, tokens=move(self.tokens), attention_mask=move(self.attention_mask),
                       image_mask=move(self.image_mask), pixel_values=move(self.pixel_values),
                       extras={k: move(v) for k, v in self.extras.items()})

    def __repr__(self) -> str:
        pix = "none" if self.pixel_values is None else "x".join(map(str, self.pixel_values.shape))
        padded = int((self.attention_mask == 0).sum())
        return (f"VLMInputs(batch={self.tokens.shape[0]}, pos={self.tokens.shape[1]}, "
                f"images={self.layout.n_images}, image_tokens={int(self.image_mask.sum())}, "
                f"pixel_values={pix}, padded_positions={padded})")


def inputs_from_tokens(model: HookedVLM, tokens: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, **extras: Any) -> VLMInputs:
    """Wrap already-expanded tokens (and pixels) as ``VLMInputs`` with the layout filled in."""
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    image_mask = tokens == model.image_token_id
    layout = model.pipeline.layout(model, image_mask, extras)
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    return VLMInputs(tokens=tokens, attention_mask=attention_mask.long(), image_mask=image_mask,
                     layout=layout, pixel_values=pixel_values, extras=extras)


def _as_rgb_image(image: Any, where: str) -> Any:
    """Check one image and return something the HF image processor accepts (PIL RGB or HWC array)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{where} is an empty image ({image.width}x{image.height}).")
        return image.convert("RGB")
    if isinstance(image, (np.ndarray, torch.Tensor)):
        arr = image.detach().cpu().numpy() if torch.is_tensor(image) else image
        if arr.ndim != 3 or 0 in arr.shape:
            raise ValueError(f"{where} has shape {arr.shape}; give an RGB image as [H, W, 3] or [3, H, W].")
        if arr.shape[-1] != 3 and arr.shape[0] == 3:
            arr = arr.transpose(1, 2, 0)
        if arr.shape[-1] != 3:
            raise ValueError(
                f"{where} has shape {arr.shape}: {arr.shape[-1]} channels, but images must be RGB "
                "(3 channels). Convert it first, e.g. PIL.Image.fromarray(a).convert('RGB')."
            )
        return arr
    raise ValueError(
        f"{where} is a {type(image).__name__}, not an image. Pass PIL images (or RGB arrays/tensors)."
    )


def _per_prompt_images(prompts: list[str], images: Any) -> list[list[Any]]:
    if images is None:
        return [[] for _ in prompts]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(prompts) == 1 and not any(isinstance(x, (list, tuple)) for x in images):
        return [list(images)]
    if len(images) != len(prompts) or not all(isinstance(x, (list, tuple)) for x in images):
        raise ValueError(
            f"For {len(prompts)} prompts pass images as a list of {len(prompts)} lists (one list of images "
            "per prompt, [] for none)."
        )
    return [list(x) for x in images]


def prepare_inputs(model: HookedVLM, prompts: str | list[str], images: Any = None, *, chat: bool = False,
                   padding_side: str = "left", **processor_kwargs: Any) -> VLMInputs:
    """Tokenize prompts and preprocess images with the checkpoint's processor.

    A prompt's ``<image>`` placeholders are expanded to the image's tokens; a prompt without any gets
    its images first. Batches are padded (left by default, for generation) and the attention mask
    makes logits at real positions equal to the unpadded run.
    """
    processor = model.processor
    if processor is None:
        raise ValueError("This model has no processor; load it with from_pretrained or pass processor= to from_hf.")
    single = isinstance(prompts, str)
    prompt_list = [prompts] if single else list(prompts)
    if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
        raise ValueError("prompts must be a string or a non-empty list of strings.")
    per_prompt = _per_prompt_images(prompt_list, images)
    placeholder = processor.image_token
    # what goes between the images and a prompt without placeholders (a processor may set it, e.g. to "")
    separator = getattr(processor, "image_placeholder_separator", "\n")
    texts, flat_images = [], []
    for i, (prompt, imgs) in enumerate(zip(prompt_list, per_prompt)):
        imgs = [_as_rgb_image(img, f"image {j} of prompt {i}") for j, img in enumerate(imgs)]
        if chat:
            prompt = _apply_chat_template(processor, prompt, n_images=0 if placeholder in prompt else len(imgs))
        n_slots = prompt.count(placeholder)
        if n_slots == 0 and imgs:
            prompt = placeholder * len(imgs) + separator + prompt
        elif n_slots != len(imgs):
            raise ValueError(
                f"prompt {i} has {n_slots} {placeholder!r} placeholder(s) but {len(imgs)} image(s) were given "
                f"for it; give one image per placeholder."
            )
        texts.append(prompt)
        flat_images.extend(imgs)
    tokenizer = processor.tokenizer
    old_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        # also as an argument: a processor's own default (some set padding_side in their text kwargs) beats the
        # tokenizer's attribute
        encoded = processor(text=texts, images=flat_images or None, return_tensors="pt", padding=True,
                            **{"padding_side": padding_side, **processor_kwargs})
    finally:
        tokenizer.padding_side = old_side
    tokens = encoded["input_ids"]
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ValueError(
            f"The prepared sequence has {tokens.shape[1]} tokens, longer than the language model's context "
            f"of {model.cfg.n_ctx}. Shorten the prompt or use fewer images."
        )
    extras = {k: v for k, v in encoded.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    return inputs_from_tokens(model, tokens, encoded.get("pixel_values"), encoded["attention_mask"], **extras)


def _apply_chat_template(processor: Any, prompt: str, n_images: int) -> str:
    if getattr(processor, "chat_template", None) is None and getattr(processor.tokenizer, "chat_template", None) is None:
        raise ValueError("chat=True, but this checkpoint has no chat template; write the prompt format yourself.")
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    conversation = [{"role": "user", "content": content}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def labelled_str_tokens(model: HookedVLM, inputs: VLMInputs) -> list[str] | list[list[str]]:
    """String tokens with image tokens labelled ``<img{i} r{row} c{col}>`` (``<img{i} extra{k}>``)."""
    rows = []
    for b in range(inputs.tokens.shape[0]):
        labels = [model.tokenizer.decode([t]) for t in inputs.tokens[b].tolist()]
        if inputs.layout.axis == "keys":  # images are read through cross-attention: label the placeholders
            placeholders = (inputs.tokens[b] == model.image_token_id).nonzero().flatten().tolist()
            for i, pos in zip(inputs.layout.images_in_row(b), placeholders):
                labels[pos] = f"<img{i}>"
            rows.append(labels)
            continue
        for i in inputs.layout.images_in_row(b):
            span = inputs.layout.spans[i]
            for k, pos in enumerate(span.extra.tolist()):
                labels[pos] = f"<img{i} extra{k}>"
            for k, pos in enumerate(span.newlines.tolist()):
                labels[pos] = f"<img{i} newline{k}>"
            _label_grid(labels, span.grid, f"<img{i} ")
            if span.crop_grid is not None:
                _label_grid(labels, span.crop_grid, f"<img{i} crop ")
        rows.append(labels)
    return rows[0] if len(rows) == 1 else rows


def _label_grid(labels: list[str], grid: torch.Tensor, prefix: str) -> None:
    for r, row in enumerate(grid.tolist()):
        for c, pos in enumerate(row):
            labels[pos] = f"{prefix}r{r} c{c}>"
