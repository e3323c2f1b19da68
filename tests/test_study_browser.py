"""The HTML report opened in headless Chromium: it renders, and every embedded figure loads."""

import os
import re
import shutil
import subprocess

import pytest

from ropescope.study.report.page import build_report
from ropescope.study.run.runner import DATABASE
from tests.helpers import fill_store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium and sets this, so there the test can only pass by rendering; elsewhere it may skip.
REQUIRED = os.environ.get("ROPESCOPE_REQUIRE_CHROMIUM") == "1"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000"]
COUNT_IMAGES = """<script>window.addEventListener('load', () => { const all = [...document.images];
document.title = 'loaded ' + all.filter(i => i.complete && i.naturalWidth > 0).length + ' of ' + all.length; });
</script></body>"""


# Each table against the block it sits in: a table wider than that is cut off or needs scrolling.
MEASURE_TABLES = """<script>window.addEventListener('load', () => {
const tables = [...document.querySelectorAll('table')];
const fit = tables.filter(t => t.getBoundingClientRect().width <= t.parentElement.clientWidth + 0.5);
const page = document.documentElement;
document.title = 'fit ' + fit.length + ' of ' + tables.length + ' in ' + page.clientWidth
  + ' page ' + page.scrollWidth; });
</script></body>"""


def chromium(*arguments, profile):
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *arguments],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="Chromium is not installed (CI installs it)")
def test_report_renders_with_every_image_loaded(tmp_path):
    fill_store(tmp_path / DATABASE)
    page = build_report(tmp_path)["html"]
    probe = tmp_path / "probe.html"  # the report plus a script that counts loaded images into the title
    probe.write_text(page.read_text().replace("</body>", COUNT_IMAGES))
    dom = chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "profile-a").stdout
    found = re.search(r"<title>loaded (\d+) of (\d+)</title>", dom)
    assert found, dom[:500]
    loaded, total = map(int, found.groups())
    assert total == 7 and loaded == total
    screenshot = tmp_path / "report.png"
    chromium(f"--screenshot={screenshot}", "--window-size=1200,2400", page.as_uri(), profile=tmp_path / "profile-b")
    assert screenshot.read_bytes()[:4] == b"\x89PNG" and screenshot.stat().st_size > 50_000


@pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="Chromium is not installed (CI installs it)")
def test_every_table_fits_the_page_at_1300_pixels(tmp_path):
    fill_store(tmp_path / DATABASE)  # a results table of 12 columns, as in the default study
    page = build_report(tmp_path)["html"]
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", MEASURE_TABLES))
    dom = chromium("--dump-dom", "--window-size=1300,2000", probe.as_uri(), profile=tmp_path / "profile").stdout
    found = re.search(r"<title>fit (\d+) of (\d+) in (\d+) page (\d+)</title>", dom)
    assert found, dom[:500]
    fit, total, width, page_width = map(int, found.groups())
    assert width > 1200 and total == 5 and fit == total  # the results table, the readouts and each finding's tests
    assert page_width <= width  # and nothing else makes the page scroll sideways
