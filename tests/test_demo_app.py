"""``bitdance demo`` end to end in a real browser: Debian's headless chromium driven by selenium through the system
chromedriver (nothing is downloaded), against the server started by the command itself on 127.0.0.1.

The screenshot in the docs is taken by the first test after its generation; redo it with

    BITDANCE_DEMO_SCREENSHOT=docs/demo.png python -m pytest tests/test_demo_app.py -k prompted
"""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from bitdance_diffusers.demo import MAX_SEED
from bitdance_diffusers.training.shapes_detector import detect_shape


SERVER_START_TIMEOUT = 180  # seconds: importing torch, diffusers and gradio on a busy 2-core machine
GENERATION_TIMEOUT = 120
# The shapes model draws these with 10 steps of UniPC as with its 50 default steps (benchmarks/RESULTS.md).
FAST_SETTINGS = {"steps": "10", "sampler": "flow-unipc"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, log: Path):
    """Wait until ``server`` answers at ``url``; fail with the end of its log if it exits or never answers."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the demo exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no answer from {url} after {SERVER_START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """``bitdance demo`` (the shipped shapes model, offline) on a free port of 127.0.0.1."""
    folder = tmp_path_factory.mktemp("demo_server")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(folder / "gradio")}  # fmt: skip
    log = folder / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "bitdance_diffusers.cli", "demo", "--port", str(port)],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=folder)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(url, server, log)
        yield url
        assert server.poll() is None, f"the demo server died:\n{log.read_text()[-3000:]}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail("The browser tests need Debian's chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1180"):
        options.add_argument(argument)
    # An explicit driver path: Selenium Manager stays out (it would try to download a driver).
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def element(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def open_page(driver, url: str, ready_selector: str = "#generate"):
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ready_selector))
    # Record every text the gallery's progress display shows during a run.
    driver.execute_script("""
        window.progressTexts = new Set();
        new MutationObserver(() => {
            const tracker = document.querySelector('#gallery [data-testid="status-tracker"]');
            if (tracker && tracker.innerText.trim()) window.progressTexts.add(tracker.innerText.trim());
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    """)


def type_into(driver, selector: str, text: str):
    field = element(driver, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)


def choose(driver, elem_id: str, option: str):
    """Pick ``option`` in the dropdown ``elem_id`` as a user does: open it, click the option."""
    element(driver, f"#{elem_id} input").click()
    WebDriverWait(driver, 10).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f'#{elem_id} li[role="option"][aria-label="{option}"]')
    )[0].click()


def gallery_images(driver, count: int):
    """Wait for ``count`` images in the gallery; returns their ``img`` elements."""
    WebDriverWait(driver, GENERATION_TIMEOUT).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == count
    )
    return driver.find_elements(By.CSS_SELECTOR, "#gallery img")


def toast_texts(driver) -> list[str]:
    return [toast.text for toast in driver.find_elements(By.CSS_SELECTOR, '[data-testid="toast-text"]')]


def wait_for_toast(driver, pattern: str) -> str:
    matches = WebDriverWait(driver, 30).until(
        lambda d: [text for text in toast_texts(d) if re.search(pattern, text)]
    )
    return matches[0]


def fetch_png(url: str) -> Image.Image:
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{url} is not a PNG"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def download_selected_image(driver, downloads: Path) -> Image.Image:
    """Click the gallery's Download button (the image shown large) and read the file the browser saved."""
    before = set(downloads.iterdir())
    element(driver, '#gallery button[aria-label="Download"]').click()
    new_files = WebDriverWait(driver, 30).until(
        lambda d: [path for path in set(downloads.iterdir()) - before if not path.name.endswith(".crdownload")]
    )
    assert new_files[0].suffix == ".png", new_files
    image = Image.open(new_files[0])
    assert image.format == "PNG"
    return image


def assert_draws(image: Image.Image, color: str, position: str, background: str):
    assert image.size == (128, 128)
    detection = detect_shape(image)
    assert (detection.color, detection.position, detection.background) == (color, position, background), detection


def generate(driver, prompt: str, seed: str = "42", num_images: str = "1"):
    type_into(driver, "#prompt textarea", prompt)
    type_into(driver, "#seed input", seed)
    type_into(driver, "#num-images input[type=number]", num_images)
    type_into(driver, "#steps input[type=number]", FAST_SETTINGS["steps"])
    if element(driver, "#sampler input").get_attribute("value") != FAST_SETTINGS["sampler"]:
        choose(driver, "sampler", FAST_SETTINGS["sampler"])
    element(driver, "#generate").click()


def test_demo_refuses_a_busy_port_before_loading_gradio_or_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = (
            "import sys\nfrom bitdance_diffusers.cli import main\n"
            f"try:\n    main(['demo', '--port', '{port}'])\n"
            "finally:\n    print('gradio imported:', 'gradio' in sys.modules, file=sys.stderr)"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"bitdance demo: error: Cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "pass another --port" in result.stderr and "Traceback" not in result.stderr
    assert "shapes model" not in result.stderr  # refused before the model loads
    assert "gradio imported: False" in result.stderr  # the command line imports gradio only to serve


@pytest.mark.slow
def test_browser_draws_the_prompted_image(demo_url, browser, downloads):
    open_page(browser, demo_url)
    generate(browser, "a large red circle in the center on a blue background", num_images="2")
    thumbnails = gallery_images(browser, 2)
    assert [image.get_attribute("alt") for image in thumbnails] == ["seed 42", "seed 43"]
    info = element(browser, "#info").text
    assert "2 images of 128 × 128, 10 flow-unipc steps" in info, info
    # The progress bar followed the block loop (4 blocks of 16 tokens at 128 x 128).
    progress = browser.execute_script("return Array.from(window.progressTexts)")
    assert any(re.search(r"\b[1-4]/4 blocks", text) for text in progress), progress
    if os.environ.get("BITDANCE_DEMO_SCREENSHOT"):
        browser.save_screenshot(os.environ["BITDANCE_DEMO_SCREENSHOT"])

    for thumbnail in thumbnails:  # every image the page shows is a PNG of the prompt
        assert_draws(fetch_png(thumbnail.get_attribute("src")), "red", "in the center", "blue")
    browser.find_elements(By.CSS_SELECTOR, "#gallery button.thumbnail-item")[1].click()
    assert_draws(download_selected_image(browser, downloads), "red", "in the center", "blue")


@pytest.mark.slow
def test_browser_bad_input_shows_a_message_and_the_server_keeps_serving(demo_url, browser):
    open_page(browser, demo_url)
    element(browser, "#generate").click()  # no prompt
    assert "Enter a prompt" in wait_for_toast(browser, "Enter a prompt")

    generate(browser, "a large yellow circle at the bottom right on a purple background", seed=str(MAX_SEED + 1))
    message = wait_for_toast(browser, "seed must be")
    assert f"from 0 to {MAX_SEED}" in message and str(MAX_SEED + 1) in message
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")

    type_into(browser, "#seed input", "5")
    element(browser, "#generate").click()
    (image,) = gallery_images(browser, 1)
    assert image.get_attribute("alt") == "seed 5"
    assert_draws(fetch_png(image.get_attribute("src")), "yellow", "at the bottom right", "purple")

    # A negative prompt without guidance still draws, with a warning that it goes unused.
    type_into(browser, "#negative-prompt input, #negative-prompt textarea", "a blue circle")
    type_into(browser, "#guidance input[type=number]", "1")
    element(browser, "#generate").click()
    assert "negative prompt is not used" in wait_for_toast(browser, "negative prompt")
    WebDriverWait(browser, GENERATION_TIMEOUT).until(lambda d: "guidance 1," in element(d, "#info").text)


@pytest.mark.slow
def test_concurrent_requests_queue_and_match_single_runs(demo_url):
    """Two clients at once get what each gets alone: the generations queue instead of sharing the pipeline."""
    def request(client, prompt, seed):
        return client.submit(prompt, "", "128x128", 10, 7.5, "flow-unipc", seed, 1, api_name="/generate")

    prompts = [("a large red circle in the center on a blue background", 1),
               ("a large green square in the center on a white background", 2)]  # fmt: skip
    clients = [Client(demo_url, verbose=False) for _ in prompts]
    jobs = [request(client, prompt, seed) for client, (prompt, seed) in zip(clients, prompts)]  # both in flight
    together = [job.result(timeout=GENERATION_TIMEOUT) for job in jobs]
    alone = [request(clients[0], prompt, seed).result(timeout=GENERATION_TIMEOUT) for prompt, seed in prompts]
    for (gallery_together, _), (gallery_alone, _) in zip(together, alone):
        pixels_together = Image.open(gallery_together[0]["image"]).tobytes()
        assert pixels_together == Image.open(gallery_alone[0]["image"]).tobytes()
    assert_draws(Image.open(together[0][0][0]["image"]), "red", "in the center", "blue")
    assert_draws(Image.open(together[1][0][0]["image"]), "green", "in the center", "white")


@pytest.mark.slow
def test_browser_class_picker_of_an_imagenet_model(browser):
    from bitdance_diffusers.demo import build_demo
    from bitdance_diffusers.random_pipeline import build_random_imagenet_pipeline

    pipe = build_random_imagenet_pipeline(block_size=4, sample_size=4)  # 1000 classes, 64 x 64
    pipe.set_progress_bar_config(disable=True)
    demo = build_demo(pipe, model_name="tiny ImageNet", max_images=4)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        open_page(browser, f"http://127.0.0.1:{port}/", ready_selector="#class-labels")
        assert not browser.find_elements(By.CSS_SELECTOR, "#prompt")
        selected = element(browser, "#class-labels").text
        assert "golden retriever (207)" in selected, selected
        element(browser, "#class-labels input").send_keys("volcano")
        choose(browser, "class-labels", "volcano (980)")
        type_into(browser, "#steps input[type=number]", "2")
        element(browser, "#generate").click()
        images = gallery_images(browser, 2)
        assert all(fetch_png(image.get_attribute("src")).size == (64, 64) for image in images)
        assert "2 images of 64 × 64" in element(browser, "#info").text
    finally:
        demo.close()
