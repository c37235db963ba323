"""``HookedSAEVLM``: a ``HookedVLM`` with SAE Lens's ``HookedSAETransformer`` methods, plus SAEs restricted
to image tokens, text tokens or given positions.

SAE Lens does the splicing: ``add_sae`` swaps the ``HookPoint`` at the SAE's hook for SAE Lens's own
wrapper module, which returns the SAE's reconstruction (plus the error term when ``use_error_term``) and
exposes the SAE's hooks (``<hook>.hook_sae_acts_post``, ...). What this class adds:

* a position restriction per attached SAE (``positions=``), read from each call's input: the wrapper's
  per-call bypass mask (SAE Lens's mechanism for ``exclude_special_tokens``) is set before the forward
  pass and cleared after it;
* ``saes()`` and the ``run_with_*_saes`` helpers take ``positions=`` too, and the context manager puts
  back exactly what was attached before (restriction included);
* ``mlp.hook_in`` kept on vlm_lens's fast MLP (``_rebind_mlp_hook_in``). (The fast components run any
  module that stands at a hook position in place of a plain ``HookPoint``, so SAE Lens's wrapper always runs.)

SAE Lens internals used here (tested with sae-lens 6.54): the wrapper's ``set_token_mask`` (bypass where
True) and that ``HookedSAETransformer.__init__`` adds ``mlp.hook_in`` by overriding ``mlp.forward``.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from sae_lens import SAE, HookedSAETransformer
from sae_lens.util import get_special_token_ids

from vlm_lens import HookedVLM, VLMInputs
from vlm_lens._tl.kv_cache import cached_length
from vlm_lens.sae._names import is_sequence_hook

Positions = Literal["all", "image", "text"] | Sequence[int] | torch.Tensor
"""Where an attached SAE replaces the activation: ``"all"`` (SAE Lens's behaviour), ``"image"`` (image
tokens), ``"text"`` (every other position, padding included), a list / 1-D LongTensor of sequence positions
(the same in every batch row; negative ones count from the end), or a bool tensor [batch, pos] that is True
where the SAE applies. During ``generate`` positions keep indexing the whole sequence as it grows."""

@dataclass(frozen=True)
class _Attachment:
    """How one SAE is attached: what ``saes()`` restores, and what ``forward`` needs for the masks."""

    sae: SAE
    use_error_term: bool
    exclude_special_tokens: bool | list[int]
    positions: Any  # Positions, validated


class HookedSAEVLM(HookedVLM, HookedSAETransformer):
    """A ``HookedVLM`` that attaches SAE Lens SAEs at any hook point, language model or vision tower.

    Loaded like a HookedVLM (``from_pretrained``, ``from_pretrained_no_processing``, ``from_hf``,
    ``organism.load(model_class=HookedSAEVLM)``); SAEs are attached with SAE Lens's method names and
    semantics: the reconstruction replaces the activation, ``use_error_term=True`` keeps the output
    unchanged while the SAE's hooks show up in ``run_with_cache``, and attached SAEs stay on in
    ``run_with_hooks`` and ``generate``.

    Example:
        >>> from vlm_lens.sae import HookedSAEVLM, load_sae, organism_sae_path
        >>> model = HookedSAEVLM.from_pretrained("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
        >>> model = organism.load(model_class=HookedSAEVLM)  # the same on the shipped organism
        >>> sae = load_sae(organism_sae_path())  # a folder with cfg.json + sae_weights.safetensors
        >>> model.add_sae(sae, positions="image")  # reconstruction at the image tokens only
        >>> logits, cache = model.run_with_cache(inputs)
        >>> cache[sae.cfg.metadata.hook_name + ".hook_sae_acts_post"].shape  # [batch, pos, d_sae]
        torch.Size([1, 20, 512])
        >>> model.reset_saes()
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sae_attachments: dict[str, _Attachment] = {}
        _rebind_mlp_hook_in(self)

    # ------------------------------------------------------------------------------ attaching
    def add_sae(self, sae: SAE, use_error_term: bool | None = None,
                exclude_special_tokens: bool | list[int] = False, *, positions: Positions = "all") -> None:
        """Attach ``sae`` at its hook (``sae.cfg.metadata.hook_name``), replacing any SAE there.

        As SAE Lens's ``add_sae``, plus ``positions``: the SAE's output replaces the activation only at
        those positions and the original activation passes through elsewhere (with ``use_error_term`` the
        output is unchanged everywhere). ``exclude_special_tokens`` (BOS, EOS, PAD, ... or a list of ids)
        removes positions from that set. The SAE's hooks see every position either way.
        """
        name = sae.cfg.metadata.hook_name
        if name not in self.hook_dict and name not in self.acts_to_saes:
            raise ValueError(f"This model has no hook point {name!r} for the SAE (its cfg.metadata.hook_name); "
                             "see model.hook_dict for the names, e.g. 'blocks.1.hook_resid_post'.")
        positions = _check_positions(name, positions)
        if exclude_special_tokens is not False:
            _require_sequence_hook(name, "exclude_special_tokens")
        # The bypass mask is ours to set (it combines positions and special tokens), so SAE Lens's own
        # exclude_special_tokens is left off: its forward would otherwise overwrite the mask.
        super().add_sae(sae, use_error_term=use_error_term, exclude_special_tokens=False)
        if self.acts_to_saes.get(name) is not sae:
            raise ValueError(f"SAE Lens did not attach the SAE at {name!r} (see its log); nothing was changed.")
        resolved = sae.use_error_term if use_error_term is None else use_error_term
        self._sae_attachments[name] = _Attachment(sae, resolved, exclude_special_tokens, positions)

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """Detach the SAEs at ``act_names`` (default: all), putting the original hook points back."""
        super().reset_saes(act_names)
        self._sae_attachments = {k: v for k, v in self._sae_attachments.items() if k in self.acts_to_saes}

    @contextmanager
    def saes(self, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True, use_error_term: bool | None = None,
             exclude_special_tokens: bool | list[int] = False, *, positions: Positions = "all") -> Iterator[HookedSAEVLM]:
        """Attach ``saes`` for the duration of the block; on exit put back what was attached before
        (with its own settings), unless ``reset_saes_end=False``."""
        saes = [saes] if isinstance(saes, SAE) else list(saes)
        before = [(sae.cfg.metadata.hook_name, self._attachment(sae.cfg.metadata.hook_name)) for sae in saes]
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens,
                             positions=positions)
            yield self
        finally:
            if reset_saes_end:
                for name, previous in reversed(before):
                    if name in self.acts_to_saes:
                        self.reset_saes(name)
                    if previous is not None:
                        self.add_sae(previous.sae, use_error_term=previous.use_error_term,
                                     exclude_special_tokens=previous.exclude_special_tokens,
                                     positions=previous.positions)

    def run_with_saes(self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                      positions: Positions = "all", **model_kwargs: Any) -> Any:
        """One forward pass with ``saes`` attached (as SAE Lens's, plus ``positions``)."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens, positions=positions):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                                 positions: Positions = "all", **kwargs: Any) -> Any:
        """``run_with_cache`` with ``saes`` attached (as SAE Lens's, plus ``positions``)."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens, positions=positions):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                                 positions: Positions = "all", **kwargs: Any) -> Any:
        """``run_with_hooks`` with ``saes`` attached (as SAE Lens's, plus ``positions``)."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens, positions=positions):
            return self.run_with_hooks(*model_args, **kwargs)

    def _attachment(self, name: str) -> _Attachment | None:
        found = self._sae_attachments.get(name)
        return found if found is not None and self.acts_to_saes.get(name) is found.sae else None

    # ------------------------------------------------------------------------------ forward
    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        """HookedVLM's forward; restricted SAEs get this call's bypass mask for its duration."""
        restricted = [(name, a) for name in list(self._sae_attachments)
                      if (a := self._attachment(name)) is not None
                      and not (isinstance(a.positions, str) and a.positions == "all" and a.exclude_special_tokens is False)]
        if not restricted:
            return super().forward(input, *args, **kwargs)
        tokens, image_mask = (t.cpu() for t in self._tokens_and_image_mask(input, kwargs))
        offset = cached_length(kwargs.get("past_kv_cache"))
        wrappers = []
        try:
            for name, attachment in restricted:
                wrapper = self.get_submodule(attachment.sae.cfg.metadata.hook_name_out or name)
                wrapper.set_token_mask(self._bypass_mask(attachment, tokens, image_mask, offset))
                wrappers.append(wrapper)
            return super().forward(input, *args, **kwargs)
        finally:
            for wrapper in wrappers:
                wrapper.set_token_mask(None)

    def _tokens_and_image_mask(self, input: Any, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(input, VLMInputs):
            return input.tokens, input.image_mask
        if isinstance(input, (str, list)):
            input = self.to_tokens(input)
        elif torch.is_tensor(input) and input.is_floating_point():
            input = kwargs.get("tokens")
            if input is None:
                raise ValueError("An SAE attached with positions= or exclude_special_tokens needs the tokens to "
                                 "place its positions; with start_at_layer pass tokens=... as well.")
        tokens = input if input.ndim == 2 else input[None]
        return tokens, tokens == self.image_token_id

    def _bypass_mask(self, attachment: _Attachment, tokens: torch.Tensor, image_mask: torch.Tensor,
                     offset: int) -> torch.Tensor:
        """[batch, pos] bool on the model's device, True where the original activation passes through (SAE
        Lens's convention)."""
        positions = attachment.positions
        if isinstance(positions, str):
            keep = {"all": torch.ones_like(image_mask), "image": image_mask, "text": ~image_mask}[positions]
        else:
            keep = _positions_mask(positions, tokens.shape, offset, attachment.sae.cfg.metadata.hook_name)
        special = attachment.exclude_special_tokens
        if special is not False:
            ids = special if isinstance(special, list) else get_special_token_ids(self.tokenizer)
            keep = keep & ~torch.isin(tokens, torch.as_tensor(ids, dtype=tokens.dtype, device=tokens.device))
        return ~keep.to(self.cfg.device)


def _require_sequence_hook(name: str, what: str) -> None:
    if not is_sequence_hook(name):
        raise ValueError(
            f"{what} needs a language-model hook whose activations are [batch, pos, ...]; {name!r} is not one "
            "(vision-tower and projector hooks hold only image patches, attention patterns are [batch, head, "
            "query, key]). Attach this SAE with positions='all', or train it on a residual-stream hook."
        )


def _check_positions(name: str, positions: Any) -> Any:
    if isinstance(positions, str):
        if positions not in ("all", "image", "text"):
            raise ValueError(f"positions={positions!r}; use 'all', 'image', 'text', a list of positions or a "
                             "bool mask [batch, pos].")
        if positions != "all":
            _require_sequence_hook(name, f"positions={positions!r}")
        return positions
    _require_sequence_hook(name, "positions")
    positions = torch.as_tensor(positions)
    if positions.dtype == torch.bool:
        if positions.ndim != 2:
            raise ValueError(f"a bool positions mask must be [batch, pos]; got shape {tuple(positions.shape)}.")
    elif positions.is_floating_point() or positions.ndim != 1:
        raise ValueError(f"positions must be a 1-D list of integer positions; got dtype {positions.dtype} and "
                         f"shape {tuple(positions.shape)}.")
    return positions


def _positions_mask(positions: torch.Tensor, shape: torch.Size, offset: int, name: str) -> torch.Tensor:
    """True at the chosen positions of this call. Positions index the whole sequence so far (a cached
    generation step at ``offset`` sees those at or after it); positions past its end select nothing yet, so
    one list also covers tokens that ``generate`` has still to write; negative ones count from its end."""
    batch, length = shape
    total = offset + length
    if positions.dtype == torch.bool:
        if positions.shape[0] != batch:
            raise ValueError(f"the positions mask of the SAE at {name} has {positions.shape[0]} rows; the input "
                             f"has {batch}.")
        keep = torch.zeros(batch, max(total, positions.shape[1]), dtype=torch.bool)
        keep[:, :positions.shape[1]] = positions.cpu()
        return keep[:, offset:total]
    index = positions.long().cpu()
    bad = index[index < -total]
    if len(bad):
        raise ValueError(f"positions {bad.tolist()} of the SAE at {name} count back past the start of the "
                         f"{total}-token sequence.")
    keep = torch.zeros(total, dtype=torch.bool)
    keep[index[index < total] % total] = True
    return keep[offset:].expand(batch, length)


def _rebind_mlp_hook_in(model: HookedSAETransformer) -> None:
    """SAE Lens adds ``mlp.hook_in`` by binding the MLP's forward at construction time, before HookedVLM
    installs its fast MLP class; call whatever class the MLP has now, after ``hook_in``."""
    for block in model.blocks:
        mlp = getattr(block, "mlp", None)
        if mlp is not None and hasattr(mlp, "hook_in") and "forward" in vars(mlp):
            mlp.forward = types.MethodType(_mlp_forward_with_hook_in, mlp)


def _mlp_forward_with_hook_in(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return type(mlp).forward(mlp, mlp.hook_in(x))
