"""Loading SAE Lens SAEs: from a local folder in SAE Lens's format, from SAE Lens's pretrained registry
(online), or the SAE that ships with the model organism."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_lens import SAE

ORGANISM_SAE = "blocks.1.hook_resid_post"
"""The hook of the SAE shipped for the organism (trained on its image tokens)."""


def load_sae(name_or_path: str | Path, sae_id: str | None = None, *, device: str = "cpu",
             dtype: str | None = None) -> SAE[Any]:
    """An SAE Lens ``SAE`` from a local folder (``cfg.json`` + ``sae_weights.safetensors``, as written by
    ``sae.save_model``), or with ``sae_id`` from SAE Lens's pretrained registry (``release``, ``sae_id``;
    this downloads from the Hugging Face Hub).

    Example:
        >>> _ = load_organism_sae().save_model("my_saes/blocks.1.hook_resid_post")  # a folder to load
        >>> sae = load_sae("my_saes/blocks.1.hook_resid_post")
        >>> sae.cfg.metadata.hook_name, sae.cfg.d_in, sae.cfg.d_sae
        ('blocks.1.hook_resid_post', 128, 512)
        >>> sae = load_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")  # online  # doctest: +SKIP
    """
    path = Path(name_or_path)
    if path.is_dir():
        if sae_id is not None:
            raise ValueError(f"{str(path)!r} is a local folder; sae_id={sae_id!r} is only for SAE Lens releases.")
        if not (path / "cfg.json").is_file():
            raise ValueError(f"{str(path)!r} has no cfg.json: it is not an SAE saved in SAE Lens's format "
                             "(sae.save_model(folder) writes cfg.json and sae_weights.safetensors).")
        return SAE.load_from_disk(path, device=device, dtype=dtype)
    if sae_id is None:
        raise ValueError(f"{str(name_or_path)!r} is not a local folder. For an SAE from SAE Lens's registry give "
                         "its release and id: load_sae(release, sae_id), e.g. load_sae('gpt2-small-res-jb', "
                         "'blocks.8.hook_resid_pre').")
    return SAE.from_pretrained(str(name_or_path), sae_id, device=device, **({"dtype": dtype} if dtype else {}))


def organism_sae_path(hook_name: str = ORGANISM_SAE) -> Path:
    """The folder of an SAE shipped for the model organism (SAE Lens's on-disk format)."""
    path = Path(__file__).resolve().parent / "weights" / "organism" / hook_name
    if not (path / "cfg.json").is_file():
        shipped = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise ValueError(f"No organism SAE at {hook_name!r}; shipped: {shipped}.")
    return path


def load_organism_sae(hook_name: str = ORGANISM_SAE, *, device: str = "cpu") -> SAE[Any]:
    """The SAE trained on the shipped organism's residual stream at its image tokens
    (``python -m vlm_lens.sae.train_organism`` made it; its figures are in the folder's ``metrics.json``).

    Example:
        >>> from vlm_lens import organism
        >>> from vlm_lens.sae import HookedSAEVLM, load_organism_sae
        >>> model = organism.load(model_class=HookedSAEVLM)
        >>> model.add_sae(load_organism_sae(), positions="image")
        >>> list(model.acts_to_saes)
        ['blocks.1.hook_resid_post']
    """
    return load_sae(organism_sae_path(hook_name), device=device)
