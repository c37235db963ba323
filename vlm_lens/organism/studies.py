"""The seed studies of Neo et al. (2024) on an organism's held-out items, built on ``vlm_lens.analysis``.

- ``object_ablation``: mean-ablate the visual tokens of the objects the answer needs (``target_mask`` grown
  by a buffer of 0, 1, 2 cells) against as many random image tokens outside that region, per question type.
- ``logit_lens_hits``: per layer, the fraction of object patches whose top-k tokens name the object's
  colour, its shape, or either; the same at background patches as a control.
- ``knockout_windows``: block attention from the answer positions to the object (+ buffer) tokens, to the
  rest of the image and to the image's last grid row, in sliding windows of layers.

Items are the organism's (``organism.ShapesDataset``): ``.image .prompt .answer .question_type .objects
.target_mask``. Answers of several tokens (``describe``: "red circle") are scored on every token under
teacher forcing (``analysis.evaluate``), and "the answer positions" are every position that predicts an
answer token (``analysis.answer_positions``). Each study returns a plain dataclass whose ``table()`` is
Markdown.

On the shipped ``shapes`` organism (the 8 x 8 ``scenes`` organism's weights do not ship yet: train them with
``python -m vlm_lens.organism.train --organism scenes``; ``ShapesDataset(..., organism="scenes")`` gives its items):

>>> from vlm_lens.organism import studies
>>> data = organism.ShapesDataset("test", seed=0, size=28)
>>> mean = studies.mean_token(model, organism.ShapesDataset("test", seed=1, size=32))
>>> row = studies.object_ablation(model, data, mean, buffers=(0,)).row("all", 0)
>>> row.object_drop > 50, row.random_drop < 10
(True, True)
>>> knockout = studies.knockout_windows(model, data, window=2, buffer=0)
>>> knockout.starts, knockout.accuracy["object"][-1] < knockout.baseline
([0, 1, 2], True)
>>> studies.logit_lens_hits(model, data).n_object_patches
59
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm_lens import analysis
from vlm_lens.analysis.evaluate import HookFactory
from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs

Selection = Callable[[VLMInputs, Sequence[Any], int], list[torch.Tensor]]


def _markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: float, spec: str) -> str:
    return "n/a" if np.isnan(value) else format(value, spec)


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _prepare(model: HookedVLM, batch: Sequence[Any]) -> VLMInputs:
    return model.prepare([it.prompt for it in batch], images=[[it.image] for it in batch])


def mean_token(model: HookedVLM, items: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
    """The mean visual token (``hook_image_embeds``) over ``items``' images: pass other held-out images than
    the ones you ablate."""
    return analysis.mean_visual_token(model, (_prepare(model, b) for b in _batches(items, batch_size)))


def targeted(items: Iterable[Any]) -> list[Any]:
    """The items whose answer needs an object (non-empty ``target_mask``; an ``exists`` "no" needs none)."""
    return [it for it in items if np.asarray(it.target_mask).any()]


# ---- position selections: per batch row, the sequence positions an intervention touches ----------------


def object_selection(inputs: VLMInputs, batch: Sequence[Any], buffer: int) -> list[torch.Tensor]:
    """The target objects' patches grown by ``buffer`` cells (``analysis.object_positions``)."""
    return [
        analysis.object_positions(inputs.layout, b, it.target_mask, buffer=buffer)
        for b, it in enumerate(batch)
    ]


def random_selection(
    inputs: VLMInputs, batch: Sequence[Any], buffer: int, seed: int = 0
) -> list[torch.Tensor]:
    """As many random image positions as ``object_selection`` has, all outside the buffered object region;
    row ``b`` draws with ``seed + b`` (pass ``seed`` = the batch's first item index, as ``object_ablation``
    does, so that each item's draw does not depend on the batch size)."""
    out = []
    for b, it in enumerate(batch):
        region = analysis.dilate(it.target_mask, buffer)
        n = int(region.sum())
        out.append(analysis.random_image_positions(inputs.layout, b, n, seed=seed + b, exclude=region))
    return out


def _per_item_seeds(seed: int):
    """A ``random_selection`` whose seed for item ``i`` (in ``evaluate``'s order) is ``seed + i``."""
    seen = 0

    def select(inputs: VLMInputs, batch: Sequence[Any], buffer: int) -> list[torch.Tensor]:
        nonlocal seen
        out = random_selection(inputs, batch, buffer, seed + seen)
        seen += len(batch)
        return out

    return select


def rest_selection(inputs: VLMInputs, batch: Sequence[Any], buffer: int) -> list[torch.Tensor]:
    """Every image position outside the buffered object region."""
    return [
        inputs.layout.mask_to_positions(b, ~analysis.dilate(it.target_mask, buffer))
        for b, it in enumerate(batch)
    ]


def last_row_selection(inputs: VLMInputs, batch: Sequence[Any], buffer: int = 0) -> list[torch.Tensor]:
    """The last row of each image's grid (``buffer`` is ignored)."""
    return [inputs.layout.grid(b)[-1] for b in range(len(batch))]


def _fits(item: Any, buffer: int) -> bool:
    """Whether the grid has as many cells outside the buffered region as inside it (for the random control)."""
    region = analysis.dilate(item.target_mask, buffer)
    return int(region.sum()) <= int((~region).sum())


# ---- object-token ablation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AblationRow:
    """Accuracies (0-1) of one question type (or "all") at one buffer.

    The object ablation covers all ``n_items``; the random control only the ``n_random`` of them whose
    buffered region leaves as many cells free (at most half the grid), against their own clean accuracy.
    """

    question_type: str
    buffer: int
    n_items: int
    tokens: float  # mean number of visual tokens ablated per item
    clean: float
    object: float  # object (+ buffer) tokens mean-ablated
    n_random: int
    random_clean: float
    random: float  # as many random tokens outside the buffered object mean-ablated

    @property
    def object_drop(self) -> float:
        """Accuracy drop in points from ablating the object tokens."""
        return 100 * (self.clean - self.object)

    @property
    def random_drop(self) -> float:
        """Accuracy drop in points from ablating the random tokens."""
        return 100 * (self.random_clean - self.random)


_ABLATION_COLUMNS = (  # (header, cell); the last three are the random control's
    ("question type", lambda r: r.question_type),
    ("buffer", lambda r: r.buffer),
    ("items", lambda r: r.n_items),
    ("tokens", lambda r: _number(r.tokens, ".1f")),
    ("clean", lambda r: _number(r.clean, ".2f")),
    ("object ablated", lambda r: _number(r.object, ".2f")),
    ("drop (pts)", lambda r: _number(r.object_drop, "+.0f")),
    ("random: items", lambda r: r.n_random),
    ("clean", lambda r: _number(r.random_clean, ".2f")),
    ("random ablated", lambda r: _number(r.random, ".2f")),
    ("drop (pts)", lambda r: _number(r.random_drop, "+.0f")),
)


@dataclass(frozen=True)
class AblationStudy:
    rows: list[AblationRow]
    n_items: int  # items with a non-empty target mask (the only ones ablated)
    n_excluded: int  # items whose answer needs no object (an empty target mask), left out

    def row(self, question_type: str, buffer: int) -> AblationRow:
        for r in self.rows:
            if (r.question_type, r.buffer) == (question_type, buffer):
                return r
        have = sorted({(r.question_type, r.buffer) for r in self.rows})
        raise KeyError(f"no row for question type {question_type!r} at buffer {buffer}; have {have}")

    def table(self) -> str:
        cells = ([cell(r) for _, cell in _ABLATION_COLUMNS] for r in self.rows)
        return _markdown([header for header, _ in _ABLATION_COLUMNS], cells)


def ablate(select: Selection, buffer: int, mean: torch.Tensor) -> HookFactory:
    """A hook factory for ``analysis.evaluate``: mean-ablate each row's ``select(inputs, batch, buffer)``."""

    def hooks(inputs: VLMInputs, batch: Sequence[Any]) -> list:
        return analysis.image_ablation_hooks(inputs, select(inputs, batch, buffer), "mean", mean=mean)

    return hooks


def _mean(values: np.ndarray, at: np.ndarray) -> float:
    return float(values[at].mean()) if at.any() else float("nan")


def object_ablation(
    model: HookedVLM,
    items: Sequence[Any],
    mean: torch.Tensor,
    *,
    buffers: Sequence[int] = (0, 1, 2),
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> AblationStudy:
    """Mean-ablate the answer's object tokens (grown by each buffer) vs as many random tokens outside
    them, per question type: the seed's table.

    ``mean`` is a mean visual token from other held-out images (``mean_token``). Items whose answer needs
    no object are left out (``n_excluded``). The random control needs as many free cells as the region
    has, so at a large buffer it runs on fewer items (``AblationRow.n_random``).
    """
    chosen = targeted(items)
    if not chosen:
        raise ValueError("no item has a non-empty target_mask; give items whose answers need an object.")
    clean = analysis.evaluate(model, chosen, batch_size=batch_size).correct.numpy()
    types = np.array([it.question_type for it in chosen])
    rows = []
    for buffer in tqdm(buffers, desc="object ablation", disable=not progress):
        fits = np.array([_fits(it, buffer) for it in chosen])
        room = [it for it, ok in zip(chosen, fits) if ok]
        ablated = analysis.evaluate(
            model, chosen, batch_size=batch_size, hooks=ablate(object_selection, buffer, mean)
        )
        control = np.full(len(chosen), np.nan)
        if room:
            select = _per_item_seeds(seed)
            run = analysis.evaluate(model, room, batch_size=batch_size, hooks=ablate(select, buffer, mean))
            control[fits] = run.correct.numpy()
        tokens = np.array([int(analysis.dilate(it.target_mask, buffer).sum()) for it in chosen])
        for kind in [*dict.fromkeys(types.tolist()), "all"]:
            at = np.ones(len(chosen), bool) if kind == "all" else types == kind
            measures = (_mean(tokens, at), _mean(clean, at), _mean(ablated.correct.numpy(), at))
            controls = (int((at & fits).sum()), _mean(clean, at & fits), _mean(control, at & fits))
            rows.append(AblationRow(kind, buffer, int(at.sum()), *measures, *controls))
    return AblationStudy(rows, len(chosen), len(items) - len(chosen))


# ---- logit lens ----------------------------------------------------------------------------------------

WORD_SETS = ("colour", "shape", "either")


@dataclass(frozen=True)
class LensHits:
    """Per layer, the fraction of patches whose top-``k`` tokens name an object's colour / shape / either.

    ``object``: over every object patch (its ``patch_mask``; a patch two objects share counts once for
    each), the words of that object. ``background``: over the patches no object touches, the same test
    against each object of the image in turn, averaged (the chance level of naming an object present in
    the image from a place where it is not).
    """

    k: int
    layers: list[int]  # language-model layers (their resid_post)
    object: dict[str, list[float]]  # WORD_SETS -> one fraction per layer
    background: dict[str, list[float]]
    n_items: int
    n_object_patches: int
    n_background_patches: int

    def table(self) -> str:
        header = ["layer", *(f"object {w}" for w in WORD_SETS), *(f"background {w}" for w in WORD_SETS)]
        columns = [*(self.object[w] for w in WORD_SETS), *(self.background[w] for w in WORD_SETS)]
        return _markdown(
            header, ([layer, *(f"{c[i]:.2f}" for c in columns)] for i, layer in enumerate(self.layers))
        )


def _add_hits(
    total: dict, lens: Any, tokenizer: Any, image: int, mask: np.ndarray, obj: Any, k: int, weight: float
) -> None:
    """Add ``weight`` x (patches of ``mask`` whose top-k names ``obj``'s colour / shape / either) to ``total``."""
    n = int(mask.sum())
    words = {"colour": [obj.colour], "shape": [obj.shape], "either": [obj.colour, obj.shape]}
    for name in WORD_SETS if n else ():
        rate = analysis.hit_rate(lens, tokenizer, words[name], k=k, image=image, mask=torch.as_tensor(mask))
        total[name] += weight * n * rate


def logit_lens_hits(
    model: HookedVLM, items: Sequence[Any], *, k: int = 5, batch_size: int = 32, progress: bool = False
) -> LensHits:
    """The seed's logit-lens curve: per layer (``resid_post``), the share of object patches whose top-``k``
    tokens over the whole vocabulary name the object's colour or shape; background patches as a control.

    Built on ``analysis.logit_lens`` and ``analysis.hit_rate`` (exact token match)."""
    hits = {
        where: {name: torch.zeros(model.cfg.n_layers) for name in WORD_SETS}
        for where in ("object", "background")
    }
    counts = {"object": 0, "background": 0}
    for batch in tqdm(list(_batches(items, batch_size)), desc="logit lens", disable=not progress):
        lens = analysis.logit_lens(model, _prepare(model, batch), k=k)
        for b, it in enumerate(batch):
            background = ~np.any([o.patch_mask for o in it.objects], axis=0)
            for obj in it.objects:
                _add_hits(hits["object"], lens, model.tokenizer, b, obj.patch_mask, obj, k, 1.0)
                _add_hits(
                    hits["background"], lens, model.tokenizer, b, background, obj, k, 1 / len(it.objects)
                )
                counts["object"] += int(obj.patch_mask.sum())
            counts["background"] += int(background.sum())
    fractions = {
        where: {name: (h / max(counts[where], 1)).tolist() for name, h in by_name.items()}
        for where, by_name in hits.items()
    }
    return LensHits(
        k,
        list(range(model.cfg.n_layers)),
        fractions["object"],
        fractions["background"],
        len(items),
        counts["object"],
        counts["background"],
    )


# ---- attention knockout --------------------------------------------------------------------------------

KNOCKOUT_TARGETS: dict[str, Selection] = {
    "object": object_selection,
    "rest of image": rest_selection,
    "last row": last_row_selection,
}


def knock_out(model: HookedVLM, select: Selection, layers: Sequence[int], buffer: int = 1) -> HookFactory:
    """A hook factory for ``analysis.evaluate``: in ``layers``, the answer positions
    (``analysis.answer_positions``) cannot attend to each row's ``select(inputs, batch, buffer)``."""

    def hooks(inputs: VLMInputs, batch: Sequence[Any]) -> list:
        queries = analysis.answer_positions(model, inputs, batch)
        return analysis.knockout_hooks(queries, select(inputs, batch, buffer), list(layers))

    return hooks


@dataclass(frozen=True)
class KnockoutStudy:
    """Accuracy (0-1) with attention from the answer positions to each target blocked in each window."""

    windows: list[list[int]]
    buffer: int
    n_items: int
    baseline: float
    accuracy: dict[str, list[float]]  # target -> one accuracy per window
    by_type: dict[str, list[dict[str, float]]]  # target -> per window, accuracy per question type

    @property
    def starts(self) -> list[int]:
        """The first layer of each window (the x axis of the seed's curves)."""
        return [w[0] for w in self.windows]

    def table(self) -> str:
        header = ("layers", *self.accuracy)
        rows = [
            (f"{w[0]}-{w[-1]}", *(f"{acc[i]:.2f}" for acc in self.accuracy.values()))
            for i, w in enumerate(self.windows)
        ]
        return _markdown(header, [("none (baseline)", *[f"{self.baseline:.2f}"] * len(self.accuracy)), *rows])


def knockout_windows(
    model: HookedVLM,
    items: Sequence[Any],
    *,
    window: int = 3,
    stride: int = 1,
    buffer: int = 1,
    targets: dict[str, Selection] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> KnockoutStudy:
    """The seed's window curves: for each window of ``window`` consecutive LM layers
    (``analysis.sliding_windows``), the accuracy when the answer positions cannot attend to each target
    (``KNOCKOUT_TARGETS``: the object + ``buffer`` cells, the rest of the image, the grid's last row).

    Only items whose answer needs an object are used (the object target must exist)."""
    chosen = targeted(items)
    if not chosen:
        raise ValueError("no item has a non-empty target_mask; give items whose answers need an object.")
    targets = KNOCKOUT_TARGETS if targets is None else targets
    windows = analysis.sliding_windows(model.cfg.n_layers, window, stride)

    baseline = analysis.evaluate(model, chosen, batch_size=batch_size).accuracy
    accuracy: dict[str, list[float]] = {name: [] for name in targets}
    by_type: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    runs = [(name, layers) for layers in windows for name in targets]
    for name, layers in tqdm(runs, desc="knockout windows", disable=not progress):
        result = analysis.evaluate(
            model, chosen, batch_size=batch_size, hooks=knock_out(model, targets[name], layers, buffer)
        )
        accuracy[name].append(result.accuracy)
        by_type[name].append(result.by_type)
    return KnockoutStudy(windows, buffer, len(chosen), baseline, accuracy, by_type)
