"""The report opens in headless Chromium with every figure loaded (Debian's `chromium`).

`.ci/run` installs the package; elsewhere the test skips with the install command.
"""

import json
import re
import shutil
import subprocess

import pytest

from kdgap.report.render import render_all

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--allow-file-access-from-files",
]  # fmt: skip

# Appended to a copy of the report: after load, record every image's load state in the DOM.
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'),
    ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));
  document.body.setAttribute('data-images', JSON.stringify(imgs));
  const delta = document.querySelector('table.delta');
  const rows = delta ? [...delta.rows].map(r => [...r.cells].map(c => c.textContent)) : [];
  document.body.setAttribute('data-delta', JSON.stringify(rows));
});</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: apt-get install chromium")
def test_report_opens_in_chromium_with_every_figure_loaded(analysis_dir, tmp_path):
    report = render_all(analysis_dir)
    probe = report.with_name("report_probe.html")
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"data-images=\"([^\"]*)\"", dom)
    assert match, "the page did not finish loading"
    images = json.loads(match.group(1).replace("&quot;", '"'))
    assert len(images) == 13  # 3 shared (with the layer profiles overlaid) + 5 per model
    assert all(i["ok"] and i["w"] > 100 for i in images), images
    assert "figures/profile_overlay.png" in [i["src"] for i in images]
    # The delta table as the browser lays it out: a header with both models, then one row
    # per measurement whose second model's cell carries its difference from the first.
    delta = json.loads(re.search(r"data-delta=\"([^\"]*)\"", dom).group(1).replace("&quot;", '"'))
    assert delta[0] == ["measurement", "organism:faithful", "organism:greedy-bypass"]
    follows = next(r for r in delta if r[0] == "action follows rationale")
    assert follows[1:] == ["1.000", "0.050 (-0.950)"]
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
         "--window-size=1280,2400", report.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
