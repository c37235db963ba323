"""The `vlm-lens demo` report: files, content, and a real browser opening it."""

import html
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from vlm_lens import organism
from vlm_lens.cli import main


@pytest.fixture(scope="module")
def tiny_report(llava_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    image = out / "input.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(image)
    code = main(["demo", "--model", str(llava_dir), "--image", str(image), "--out", str(out / "r"),
                 "--prompt", "USER : <image>\nwhat is this ? ASSISTANT :"])
    assert code == 0
    return out / "r"


def test_report_files_and_links(tiny_report):
    index = (tiny_report / "index.html").read_text()
    for name in ("logit_lens.html", "attention_lm.html", "attention_vision.html", "results.json"):
        assert f"href='{name}'" in index and (tiny_report / name).stat().st_size > 0
    pngs = sorted(p.name for p in tiny_report.glob("attention_layer*.png"))
    assert pngs == ["attention_layer0.png", "attention_layer1.png"]
    assert all(f"src='{p}'" in index for p in pngs)
    summary = json.loads((tiny_report / "results.json").read_text())
    assert html.escape(summary["answer"]) in index and summary["ground_truth"] is None
    assert "data:image/png;base64," in (tiny_report / "logit_lens.html").read_text()


def test_custom_model_needs_an_image(llava_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(llava_dir), "--out", str(tmp_path)]) == 2
    assert "--image" in capsys.readouterr().err


def test_demo_on_the_organism(tmp_path):
    if not (organism.path() / "config.json").exists():
        pytest.fail("the model organism's weights are missing")
    assert main(["demo", "--out", str(tmp_path), "--n-eval", "32"]) == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    accuracy = summary["ground_truth"]["accuracy"]
    assert set(accuracy) >= {"baseline", "ablate object", "ablate random background"}
    assert summary["answer"] == summary["expected"]
    assert (tmp_path / "ground_truth.png").exists()


def _browser():
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing: .ci/run should install them")
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1200,900", "--allow-file-access-from-files"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=opts, service=service)


def _not_blank(png: bytes) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return pixels.std() > 5


def test_report_renders_in_a_browser(tiny_report, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        driver.get((tiny_report / "index.html").as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert images and all(driver.execute_script("return arguments[0].naturalWidth", im) > 0 for im in images)
        shot = driver.get_screenshot_as_png()
        (tmp_path / "index.png").write_bytes(shot)
        assert _not_blank(shot)

        driver.get((tiny_report / "logit_lens.html").as_uri())
        cells = driver.find_elements(By.CSS_SELECTOR, ".cell")
        assert len(cells) == 16
        cell = next(c for c in cells if c.get_attribute("data-row") == "2" and c.get_attribute("data-col") == "1")
        ActionChains(driver).move_to_element(cell).perform()
        tooltip = driver.find_element(By.ID, "tooltip")
        assert tooltip.is_displayed() and len(tooltip.find_elements(By.CSS_SELECTOR, ".entry")) == 5
        shot = driver.get_screenshot_as_png()
        (tmp_path / "logit_lens.png").write_bytes(shot)
        assert _not_blank(shot)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
