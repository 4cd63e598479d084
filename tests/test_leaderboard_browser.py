"""The leaderboard site in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver`` packages, driven by selenium) loads every page without console errors,
sorting by a column reorders the rows, every link opens a page, and screenshots are saved
(into ``$ADVBENCH_SCREENSHOTS`` when set, else the test's temporary folder). Skips cleanly where
Chromium, its driver or selenium is absent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from advbench import leaderboard as lb

REAL = Path(__file__).resolve().parents[1] / "leaderboard"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="headless Chromium (chromium, chromium-driver) "
                                "is not installed")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    copy = Path(shutil.copytree(REAL, tmp_path_factory.mktemp("site") / "lb"))
    lb.build(copy)
    return copy


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("ADVBENCH_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def test_every_page_loads_without_console_errors_and_every_link_opens(site, browser, tmp_path):
    pages = [site / "index.html", *sorted(site.glob("rankings/*.html")), *sorted(site.glob("models/*.html"))]
    shots = _shots(tmp_path)
    for page in pages:
        browser.get(page.as_uri())
        assert browser.title and browser.find_element("tag name", "h1").text, page.name
        assert _errors(browser) == [], f"{page.name}: {_errors(browser)}"
        for a in browser.find_elements("tag name", "a"):
            href = a.get_attribute("href")
            assert href.startswith("file://") and Path(href[len("file://"):].split("#")[0]).is_file(), \
                f"{page.name} links to {href}"
    browser.get((site / "index.html").as_uri())
    browser.save_screenshot(str(shots / "leaderboard-index.png"))
    first = browser.find_elements("css selector", "tbody a")[0]
    first.click()  # the link really navigates
    assert "rankings/" in browser.current_url and _errors(browser) == []
    browser.save_screenshot(str(shots / "leaderboard-ranking.png"))
    browser.find_elements("css selector", "tbody a")[0].click()
    assert "models/" in browser.current_url and _errors(browser) == []
    browser.save_screenshot(str(shots / "leaderboard-model.png"))


def test_sorting_by_a_column_reorders_the_rows(site, browser):
    ranking = next(p for p in sorted(site.glob("rankings/*.html")) if p.read_text().count("<tr>") >= 3)
    browser.get(ranking.as_uri())

    def column(name: str) -> list[str]:
        heads = [th.text for th in browser.find_elements("css selector", "thead th")]
        i = next(k for k, h in enumerate(heads) if h.startswith(name))
        return [row.find_elements("tag name", "td")[i].get_attribute("data-value")
                for row in browser.find_elements("css selector", "tbody tr")]

    before = column("model")
    header = next(th for th in browser.find_elements("css selector", "thead th") if th.text.startswith("clean"))
    header.click()
    ascending = [float(v) for v in column("clean")]
    assert ascending == sorted(ascending)
    header.click()
    descending = [float(v) for v in column("clean")]
    assert descending == sorted(descending, reverse=True)
    assert sorted(column("model")) == sorted(before) and _errors(browser) == []
    model = next(th for th in browser.find_elements("css selector", "thead th") if th.text.startswith("model"))
    model.click()
    assert column("model") == sorted(before)


def test_a_run_report_page_loads_and_sorts(browser, tmp_path):
    from advbench.cli import main
    from advbench.config import parse_config
    from advbench.eval.evaluator import evaluate

    run = tmp_path / "run"
    evaluate(parse_config({"seed": 0, "device": "cpu", "data": {"name": "digits", "split": "test", "n": 20},
                           "models": ["digits-mlp", "digits-cnn"], "threats": [{"norm": "linf", "eps": [0.05, 0.1]}],
                           "attacks": ["fgsm"]}), run, progress=False)
    assert main(["report", str(run)]) == 0
    browser.get((run / "report" / "report.html").as_uri())
    assert _errors(browser) == [] and browser.find_element("tag name", "h1").text == "advbench report"
    images = browser.find_elements("tag name", "img")
    assert images and all(browser.execute_script("return arguments[0].naturalWidth", im) > 0 for im in images)
    table = next(t for t in browser.find_elements("css selector", "table.sortable")
                 if "robust low" in t.text)
    heads = table.find_elements("css selector", "thead th")
    i = next(k for k, h in enumerate(heads) if h.text.startswith("model"))
    heads[i].click()
    names = [r.find_elements("tag name", "td")[i].text for r in table.find_elements("css selector", "tbody tr")]
    assert names == sorted(names) and _errors(browser) == []
    browser.save_screenshot(str(_shots(tmp_path) / "report.png"))
