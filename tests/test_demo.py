"""The `vlm-lens demo` report: files, content, and a real browser opening it.

The report on the shipped scenes organism is the one the browser opens. ``VLM_LENS_SCREENSHOT_DIR=docs`` makes
the browser test write its full-page, 1400-px-wide screenshot to ``docs/demo_report.png`` (the picture in the README).
"""

import html
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_lens import organism
from vlm_lens.cli import main

N_EVAL = 14


@pytest.fixture(scope="module")
def tiny_report(llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    image = out / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(image)
    code = main(
        [
            "demo",
            "--model",
            str(llava_dir),
            "--image",
            str(image),
            "--out",
            str(out / "r"),
            "--prompt",
            "USER : <image>\nwhat is this ? ASSISTANT :",
        ]
    )
    assert code == 0
    return out / "r"


@pytest.fixture(scope="module")
def scenes_report(tmp_path_factory):
    """The report on the shipped scenes organism."""
    out = tmp_path_factory.mktemp("scenes_report")
    assert (
        main(
            [
                "demo",
                "--organism",
                "scenes",
                "--out",
                str(out),
                "--n-eval",
                str(N_EVAL),
            ]
        )
        == 0
    )
    return out


def test_report_files_and_links(tiny_report):
    index = (tiny_report / "index.html").read_text()
    for name in ("logit_lens.html", "attention_lm.html", "attention_vision.html", "results.json"):
        assert f"href='{name}'" in index and (tiny_report / name).stat().st_size > 0
    for name in ("input.png", "attention.png"):
        assert f'src="{name}"' in index and (tiny_report / name).stat().st_size > 0
    summary = json.loads((tiny_report / "results.json").read_text())
    assert html.escape(summary["answer"]) in index and summary["studies"] is None
    assert "Seed studies" not in index and not (tiny_report / "knockout_windows.png").exists()
    assert "data:image/png;base64," in (tiny_report / "logit_lens.html").read_text()


def test_custom_model_needs_an_image_or_an_organism(llava_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(llava_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--image" in err and "--organism" in err
    assert main(["demo", "--organism", "nonesuch", "--out", str(tmp_path)]) == 2
    assert "expected one of" in capsys.readouterr().err


def _no_nan(name):
    raise ValueError(f"{name} in results.json")


def test_scenes_report_runs_the_seed_studies(scenes_report):
    # strict JSON: a study row without items is null, not NaN (which JSON parsers refuse)
    summary = json.loads((scenes_report / "results.json").read_text(), parse_constant=_no_nan)
    assert summary["organism"] == "scenes" and summary["n_items"] == N_EVAL and summary["expected"]
    studies = summary["studies"]
    ablation = studies["ablation"]
    assert {r["buffer"] for r in ablation["rows"]} == {0, 1, 2}
    assert ablation["n_items"] + ablation["n_excluded"] == N_EVAL
    assert studies["knockout"]["windows"] == [[s, s + 1, s + 2] for s in range(6)]
    assert len(studies["logit_lens"]["object"]["either"]) == 8
    index = (scenes_report / "index.html").read_text()
    assert f"n = {N_EVAL} held-out" in index and "<table id='ablation'>" in index
    assert index.count("<tr>") == len(ablation["rows"]) + 1
    for name in ("input.png", "attention.png", "logit_lens_curve.png", "knockout_windows.png"):
        assert name in index and Image.open(scenes_report / name).size[0] >= 600
    assert Image.open(scenes_report / "attention.png").size[0] >= 1300  # 8 layers, 4 a row
    assert "grown by 1 cell" in index  # what the knockout's 'object' blocks


def test_another_question_about_an_organism_image_shows_no_expected_answer(tmp_path):
    """--prompt asks something else about the picked item's image: its answer and outline are not this one's."""
    prompt = "USER: what colour is the diamond ?\n<image> ASSISTANT:"
    assert main(["demo", "--organism", "scenes", "--out", str(tmp_path), "--n-eval", "2", "--prompt", prompt]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    index = (tmp_path / "index.html").read_text()
    assert summary["expected"] is None and "id='expected'" not in index


def test_demo_on_the_default_organism(tmp_path):
    """The README's main job: the richest shipped organism, scenes."""
    name = organism.available()[-1]
    assert name == "scenes"
    assert main(["demo", "--out", str(tmp_path), "--n-eval", "21"]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["organism"] == name and summary["answer"] == summary["expected"]
    buffer = 1 if name == "scenes" else 0  # shapes objects fill one patch each: no buffer
    row = next(
        r for r in summary["studies"]["ablation"]["rows"] if (r["question_type"], r["buffer"]) == ("all", buffer)
    )
    assert row["clean"] - row["object"] >= 0.5 and row["random_clean"] - row["random"] <= 0.1


def _browser():
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing: .ci/run should install them")
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,900",
        "--allow-file-access-from-files",
        "--hide-scrollbars",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=opts, service=service)


def _not_blank(png: bytes) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return pixels.std() > 5


def _no_console_errors(driver):
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def _check_lens_page(driver, By, ActionChains):
    """The logit-lens page (the current document): 8 x 8 cells, legible, a tooltip of 5 tokens on hover."""
    cells = driver.find_elements(By.CSS_SELECTOR, ".cell")
    assert len(cells) == 64
    font = driver.execute_script("return parseFloat(getComputedStyle(arguments[0]).fontSize)", cells[0])
    assert font >= 12
    cell = next(c for c in cells if c.get_attribute("data-row") == "5" and c.get_attribute("data-col") == "6")
    ActionChains(driver).move_to_element(cell).perform()
    tooltip = driver.find_element(By.ID, "tooltip")
    assert tooltip.is_displayed() and len(tooltip.find_elements(By.CSS_SELECTOR, ".entry")) == 5
    assert "r5 c6" in tooltip.text


def test_scenes_report_renders_in_a_browser(scenes_report, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        driver.get((scenes_report / "index.html").as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 4
        for im in images:
            src = im.get_attribute("src")
            natural, shown = driver.execute_script(
                "return [arguments[0].naturalWidth, arguments[0].clientWidth]", im
            )
            assert natural > 0 and shown >= 0.95 * natural, src  # drawn at (nearly) full size: legible
            assert _not_blank(im.screenshot_as_png), src
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, height)
        shot = driver.get_screenshot_as_png()
        assert Image.open(io.BytesIO(shot)).size[0] == 1400 and _not_blank(shot)
        folder = Path(os.environ.get("VLM_LENS_SCREENSHOT_DIR", tmp_path))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "demo_report.png").write_bytes(shot)
        driver.switch_to.frame(driver.find_element(By.TAG_NAME, "iframe"))
        _check_lens_page(driver, By, ActionChains)
        driver.switch_to.default_content()
        _no_console_errors(driver)

        driver.get((scenes_report / "logit_lens.html").as_uri())
        _check_lens_page(driver, By, ActionChains)
        _no_console_errors(driver)
    finally:
        driver.quit()


def test_the_default_item_is_one_the_model_answers_right(caplog):
    from vlm_lens import analysis, organism
    from vlm_lens.demo import pick_item

    model = organism.load()  # the shapes organism: trained, so some candidates are right
    item = pick_item(model, "shapes")
    assert item.question_type == "colour_of_shape" and bool(analysis.evaluate(model, [item]).correct[0])
    assert not caplog.records
