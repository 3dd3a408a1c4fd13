"""The web page at `/` in a real headless Chromium: upload an image, ask, see a streamed answer, save a screenshot.

Needs Debian's `chromium` and the `playwright` Python package (its own browser downloads are not used):
    apt-get install -y chromium && pip install playwright
Skipped when either is missing.
"""

import os
import shutil

import pytest
from PIL import Image

CHROMIUM = os.environ.get("GHOSTVIS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "web_screenshot.png")
# Headless in a container: no sandbox/GPU, and nothing that phones home.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    pytest.importorskip("fastapi")
    from ghostvis_hf.inference import GenerationEngine, load_model
    from ghostvis_hf.serve.server import BackgroundServer, create_app

    model, processor = load_model(tiny_checkpoint, device="cpu")
    engine = GenerationEngine(model, processor)
    background = BackgroundServer(create_app(engine, "ghostvis-tiny", max_tokens_limit=64))
    yield background.url
    background.stop()
    engine.close()


def test_upload_ask_and_see_streamed_answer(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    image = tmp_path / "red.png"
    Image.new("RGB", (96, 64), (220, 40, 40)).save(image)
    with sync_api.sync_playwright() as p:
        # A persistent context is how Playwright takes a (fresh) --user-data-dir.
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 900, "height": 640},
        )
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model-name').textContent === 'ghostvis-tiny'")
            page.set_input_files("#image-input", str(image))
            page.wait_for_selector("#preview[src^='data:image/png']")
            page.fill("#prompt", "What color is this?")
            page.click("#send")
            answer = page.wait_for_selector(".msg.assistant[data-state='done'], .msg.error", timeout=30_000)
            assert "error" not in answer.get_attribute("class"), answer.inner_text()
            assert page.locator(".msg.user img").count() == 1
            assert answer.evaluate("e => e.textContent.length") > 0  # streamed text arrived
            # A second turn re-sends the history (with the image): still answered.
            page.fill("#prompt", "And now?")
            page.keyboard.press("Enter")
            page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-state='done']\").length === 2",
                                   timeout=30_000)
            os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
            page.screenshot(path=SCREENSHOT, full_page=True)
            assert not errors, errors
        finally:
            browser.close()
