"""Every docstring example in ``vlm_lens`` runs, on the shipped organism, as a doctest.

Examples see their module's globals plus ``shared_globs`` (built once per session), so a docstring can
use ``model``, ``item``, ``inputs``, ``cache`` ... without building them itself. Only examples that name
a real hub checkpoint carry ``# doctest: +SKIP``.
"""

import doctest
import importlib
import pkgutil

import pytest

import vlm_lens

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
MIN_EXAMPLES = 196  # examples that run (not +SKIP); raise it as docstrings gain examples


def _modules() -> list:
    modules = [vlm_lens]
    for info in pkgutil.walk_packages(vlm_lens.__path__, prefix="vlm_lens."):
        modules.append(importlib.import_module(info.name))  # an import error fails collection loudly
    return modules


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    tests = [t for m in _modules() for t in finder.find(m) if t.examples]
    return sorted(tests, key=lambda t: t.name)


DOCTESTS = _doctests()


def _runs(example: doctest.Example) -> bool:
    return not example.options.get(doctest.SKIP, False)


@pytest.fixture(scope="session")
def shared_globs():
    """The names docstring examples may use without defining them. Examples must not change them."""
    import torch

    from vlm_lens import organism, viz
    from vlm_lens.analysis.probing import prepare_batches, read_kv
    from vlm_lens.sae import load_organism_sae

    model = organism.load()
    items = list(organism.ShapesDataset(split="test", seed=0, size=8))
    item = items[0]  # "what colour is the square ?" -> "blue"; the square is patch (2, 1)
    inputs = model.prepare(item.prompt, images=[item.image])
    logits, cache = model.run_with_cache(inputs)
    readout = read_kv(model, prepare_batches(model, items))  # every layer and site, 8 images
    masks = torch.stack([torch.as_tensor(it.target_mask) for it in items])  # bool [8, rows, cols]
    sae = load_organism_sae()  # at blocks.1.hook_resid_post, d_sae 512; not attached to ``model``
    return dict(torch=torch, organism=organism, viz=viz, model=model, items=items, item=item, img=item.image,
                inputs=inputs, logits=logits, cache=cache, readout=readout, masks=masks, sae=sae)


def test_enough_examples_run():
    n = sum(_runs(ex) for t in DOCTESTS for ex in t.examples)
    assert n >= MIN_EXAMPLES, f"only {n} docstring examples run (the rest are +SKIP); expected >= {MIN_EXAMPLES}"


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring(test: doctest.DocTest, shared_globs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files write here
    test = doctest.DocTest(test.examples, {**test.globs, **shared_globs}, test.name, test.filename, test.lineno,
                           test.docstring)
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    report: list[str] = []
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
    if result.attempted == 0:
        pytest.skip("every example is +SKIP (allowed only on lines that name a real hub checkpoint)")
