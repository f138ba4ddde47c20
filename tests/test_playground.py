"""The playground page at GET /, in a real browser: headless Chromium loads it from a running service (Ray Serve
over tiny random bundles, as in test_serve.py, plus a second sentiment model, with an API key), submits each panel
and checks what appears against the API's own answers. Skips with a reason where no Chromium (or Selenium) is
installed; `.ci/run` installs both when it can. (Without a key the page sends no Authorization header; the service
then ignores it.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pandas as pd
import pytest

from rnnlab import registry
from tiny_datasets import make_stock_csv
from conftest import require, serving, skip_or_fail
from tiny_models import make_bundles
from test_serve_versions import _other_version

pytestmark = pytest.mark.slow

KEY = "playground-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1050"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    """test_serve's bundles (the forecasters with an example, the others without) plus imdb-b, a second sentiment
    model with its own weights."""
    root = make_bundles(tmp_path_factory.mktemp("bundles"))
    _other_version(root / "imdb-small", root / "imdb-b", seed=1)
    return root


@pytest.fixture(scope="module")
def service(bundles, tmp_path_factory) -> str:
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(KEY)
    # from a config, as rnnlab serve deploys it: a model can then be swapped in place while the page is open
    with serving({"bundles": str(bundles), "api_key_file": str(key_file)}, from_config=True) as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                   if shutil.which(name)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        # .ci/run installs them; elsewhere the browser tests skip, saying what to install
        skip_or_fail("no Chromium and chromedriver installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = require("selenium.webdriver", "Selenium is not installed (the test extra has it)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver, element_id: str, predicate=bool, timeout: float = 60) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        elements = d.find_elements(By.ID, element_id)
        return elements and predicate(elements[0].text) and elements[0].text

    return WebDriverWait(driver, timeout).until(ready, f"#{element_id} never showed the expected text")


def fill(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def click(driver, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, element_id).click()


def open_with_key(driver, service: str) -> None:
    """The page loaded and the key typed in (the panels are up once the service has said what it serves)."""
    driver.get(f"{service}/")
    wait_for_text(driver, "serving", lambda t: t.startswith("serving:"))
    fill(driver, "api-key", KEY)
    driver.execute_script("document.getElementById('api-key').blur()")  # the key is read on its change event


def picker_labels(driver, job: str) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(`select.model[data-job='${arguments[0]}'] option`), "
        "(o) => o.textContent)", job)


def expected_labels(service: str, job: str) -> list[str]:
    """What a picker should list: the job's models in /v1/models, each with its version, the default marked."""
    listed = httpx.get(f"{service}/v1/models", headers=AUTH, timeout=60).json()["data"]
    return [f"{m['id']} ({m['version']})" + (", default" if m["default"] else "") for m in listed if m["job"] == job]


def wait_until(driver, condition, message: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(), message)


def test_the_page_is_one_static_file_with_nothing_from_elsewhere(service):
    page = httpx.get(f"{service}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "rnnlab playground" in page.text
    for outside in ('src="http', "src='http", 'href="http', "href='http", "@import", "//cdn"):
        assert outside not in page.text  # no CDN: everything the page needs is in it


def test_each_panel_in_a_real_browser(service, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{service}/")
    assert "charlm" in wait_for_text(browser, "serving", lambda t: t.startswith("serving:"))

    # the page itself is open; the API is not, until the key goes in the field
    fill(browser, "review", "The movie was great, a great plot and a great cast.")
    click(browser, "classify")
    assert "API key" in wait_for_text(browser, "sentiment-out", lambda t: t.startswith("401"))
    fill(browser, "api-key", KEY)
    click(browser, "classify")
    label = wait_for_text(browser, "sentiment-label")
    probability = float(wait_for_text(browser, "sentiment-probability").split("=")[1])
    expected = httpx.post(f"{service}/v1/sentiment", json={"texts": [
        "The movie was great, a great plot and a great cast."]}, headers=AUTH, timeout=30).json()["results"][0]
    assert label == expected["label"] and probability == pytest.approx(expected["probability"], abs=1e-3)
    # P(positive) as a needle on a meter from negative to positive, "(unsure)" beside the label strictly inside
    # 0.35-0.65, and how many of the words the model knows
    meter = browser.find_element(By.ID, "sentiment-meter")
    assert float(meter.get_attribute("aria-valuenow")) == pytest.approx(expected["probability"], abs=1e-6)
    needle = browser.find_element(By.ID, "sentiment-needle")
    centre = needle.location["x"] + needle.size["width"] / 2 - meter.location["x"]
    assert centre / meter.size["width"] == pytest.approx(expected["probability"], abs=0.01)
    unsure = 0.35 < expected["probability"] < 0.65
    assert browser.find_element(By.ID, "sentiment-unsure").text == ("(unsure)" if unsure else "")
    assert browser.find_element(By.ID, "sentiment-known").text == (
        f"{expected['known_tokens']} of {expected['tokens']} words known")

    # streamed text, reassembled from the events, equals the same seeded request answered in one piece
    fill(browser, "prompt", "the war")
    for element_id, value in (("max-new-tokens", "80"), ("temperature", "0.9"), ("top-k", "10"), ("top-p", "0.95"),
                              ("seed", "7")):
        fill(browser, element_id, value)
    click(browser, "run-generate")
    wait_for_text(browser, "generate-meta", lambda t: "80 characters" in t)
    streamed = browser.find_element(By.ID, "generated-text").get_attribute("textContent")
    whole = httpx.post(f"{service}/v1/charlm", json={"prompt": "the war", "max_new_tokens": 80, "temperature": 0.9,
                                                       "top_k": 10, "top_p": 0.95, "seed": 7},
                       headers=AUTH, timeout=60).json()
    assert streamed == whole["text"] and "seed 7" in browser.find_element(By.ID, "generate-meta").text

    # forecast from an uploaded Yahoo CSV: the file's last day, back-tested, drawn beside close = open
    csv = make_stock_csv(tmp_path)
    browser.find_element(By.ID, "csv-file").send_keys(str(csv))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "csv").get_attribute("value"), "no upload")
    click(browser, "run-forecast")
    shown = float(wait_for_text(browser, "forecast-close").replace(",", ""))
    prices = pd.read_csv(csv).tail(400)
    rows = [{"date": r.Date, "open": r.Open, "high": r.High, "low": r.Low, "close": r.Close, "volume": r.Volume}
            for r in prices.itertuples()]
    forecast = httpx.post(f"{service}/v1/stock", json={"rows": rows}, headers=AUTH, timeout=30).json()["forecast"]
    assert shown == pytest.approx(forecast["close"], abs=0.006)
    assert browser.find_element(By.ID, "forecast-date").text == forecast["date"]
    assert float(browser.find_element(By.ID, "forecast-actual").text.replace(",", "")) == pytest.approx(
        forecast["actual_close"], abs=0.006)
    chart = browser.find_element(By.ID, "forecast-chart")
    assert chart.find_elements(By.TAG_NAME, "polyline") and chart.find_elements(By.ID, "forecast-point")

    # the next days as quantiles from the same file in the horizon panel: its table is the API's answer
    browser.find_element(By.ID, "horizon-csv-file").send_keys(str(csv))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "horizon-csv").get_attribute("value"),
                                     "no upload")
    click(browser, "run-horizon")
    origin = wait_for_text(browser, "horizon-origin")
    quantiles = httpx.post(f"{service}/v1/horizon", json={"rows": rows}, headers=AUTH, timeout=30).json()["forecast"]
    assert origin.startswith(f"from {quantiles['origin']}'s close")
    table = [[float(cell.text.replace(",", "")) for cell in row.find_elements(By.TAG_NAME, "td")[1:]]
             for row in browser.find_elements(By.CSS_SELECTOR, "#horizon-table tr")[1:]]
    assert table == [pytest.approx(step["values"], abs=0.006) for step in quantiles["steps"]]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#fan-chart polygon.fan")) == 3

    # the next day, from an open typed in (near the last close: a far one is refused as no real index's): no
    # actual close yet
    browser.execute_script("document.getElementById('next-date').value = '2023-07-03'")
    fill(browser, "next-open", "690.5")
    click(browser, "run-forecast")
    wait_for_text(browser, "forecast-date", lambda t: t == "2023-07-03")
    assert browser.find_element(By.ID, "forecast-actual").text == "not known yet"
    assert browser.find_element(By.ID, "forecast-open").text == "690.50"

    browser.execute_script("window.scrollTo(0, 0)")
    screenshot = tmp_path / "playground.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000


def test_the_sentiment_panel_says_so_when_the_model_knows_none_of_the_words(service, browser):
    from selenium.webdriver.common.by import By

    open_with_key(browser, service)
    fill(browser, "review", "qwxz blorfle zzyzx")
    click(browser, "classify")
    assert wait_for_text(browser, "sentiment-label") == "unknown"
    assert "knows none of these words" in browser.find_element(By.ID, "sentiment-unknown").text
    assert browser.find_element(By.ID, "sentiment-known").text == "0 of 3 words known"
    # no meter and no probability: the 0.5 in the answer is not the model's estimate
    assert not browser.find_elements(By.ID, "sentiment-meter")
    assert browser.find_element(By.ID, "sentiment-probability").text == ""


def test_bad_input_shows_the_services_sentence(service, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{service}/")
    wait_for_text(browser, "serving", lambda t: t.startswith("serving:"))
    fill(browser, "api-key", KEY)
    browser.execute_script("document.getElementById('csv').value = arguments[0]",
                           "Date,Open,High,Low,Close,Adj Close,Volume\n2023-01-03,1,1,1,1,1,100\n2023-01-04,1,1,1,1,1,100")
    click(browser, "run-forecast")
    message = wait_for_text(browser, "forecast-out", lambda t: t.startswith("422"))
    assert "259" in message  # the minimum history, in the service's own words
    fill(browser, "prompt", "the ☃")
    click(browser, "run-generate")
    assert "☃" in wait_for_text(browser, "generate-meta", lambda t: t.startswith("422"))
    assert browser.find_elements(By.CSS_SELECTOR, "#generate-meta .error")


def test_every_served_job_has_a_panel_whose_picker_lists_its_models_and_follows_a_swap(service, browser, bundles,
                                                                                        tmp_path):
    from selenium.webdriver.common.by import By

    from rnnlab.serve.versions import swap

    open_with_key(browser, service)
    for job in registry.served():  # the page follows what the service serves: a panel and a picker for each job
        wait_until(browser, lambda: picker_labels(browser, job) == expected_labels(service, job),
                   f"the {job} picker never listed the job's models")
        panel = browser.find_element(By.CSS_SELECTOR, f"section[data-job='{job}']")
        assert panel.is_displayed() and panel.find_element(By.CSS_SELECTOR, "select.model").is_displayed()
    sentiment = picker_labels(browser, "sentiment")
    assert len(sentiment) == 2 and sentiment[0].startswith("imdb-b (") and sentiment[1].startswith("imdb-small (")

    # imdb-b swapped to other weights in place: the picker shows its new version once it is opened again
    version = swap({"imdb-b": _other_version(bundles / "imdb-small", tmp_path / "imdb-b-2", seed=2)},
                   say=lambda line: None)["imdb-b"]
    assert version not in sentiment[0]
    browser.find_element(By.ID, "model-sentiment").click()
    wait_until(browser, lambda: picker_labels(browser, "sentiment")[0] == f"imdb-b ({version}), default",
               "the sentiment picker never showed imdb-b's new version")
    browser.find_element(By.ID, "model-sentiment").click()  # closed again
    click(browser, "classify")
    assert wait_for_text(browser, "sentiment-out", lambda t: "@" in t).endswith(f"imdb-b@{version}")


def test_the_forecast_panels_load_their_models_example_in_one_click_and_draw_it(service, browser):
    from selenium.webdriver.common.by import By

    open_with_key(browser, service)
    example = httpx.get(f"{service}/v1/stock/example", headers=AUTH, timeout=60).json()
    wait_until(browser, lambda: browser.find_element(By.ID, "stock-example").is_enabled(), "no stock example")
    click(browser, "stock-example")
    wait_until(browser, lambda: browser.find_element(By.ID, "csv").get_attribute("value"), "the example never loaded")
    lines = browser.find_element(By.ID, "csv").get_attribute("value").splitlines()
    assert len(lines) == 1 + len(example["rows"]) and lines[-1].startswith(example["rows"][-1]["date"] + ",")
    click(browser, "run-forecast")
    assert wait_for_text(browser, "forecast-date") == example["rows"][-1]["date"]  # the example's last day
    points = browser.find_element(By.CSS_SELECTOR, "#forecast-chart polyline").get_attribute("points").split()
    assert len(points) == 60 and browser.find_elements(By.ID, "forecast-point")  # the last 60 closes, the forecast

    example = httpx.get(f"{service}/v1/horizon/example", headers=AUTH, timeout=60).json()
    wait_until(browser, lambda: browser.find_element(By.ID, "horizon-example").is_enabled(), "no horizon example")
    click(browser, "horizon-example")
    wait_until(browser, lambda: browser.find_element(By.ID, "horizon-csv").get_attribute("value"),
               "the example never loaded")
    click(browser, "run-horizon")
    assert wait_for_text(browser, "horizon-origin").startswith(f"from {example['rows'][-1]['date']}'s close")
    steps = browser.find_elements(By.CSS_SELECTOR, "#horizon-table tr")[1:]
    answer = httpx.post(f"{service}/v1/horizon", json=example, headers=AUTH, timeout=60).json()["forecast"]
    assert len(steps) == len(answer["steps"]) == 5
    median = browser.find_element(By.ID, "fan-median").get_attribute("points").split()
    assert len(median) == 1 + len(answer["steps"])  # from the origin's close through each step's median

