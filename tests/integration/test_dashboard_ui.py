"""Report endpoints (/jobs/{id}/report[.png|.pdf]) and the dashboard (/ui, /ui/jobs/{id}) on a real
uvicorn server with a real job run by the worker code; the dashboard is rendered in headless
Chromium (Debian package `chromium`; those tests skip only when it is absent)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.client_harness import TINY_SPEC, run_job_to_end, serve

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIZE = (1200, 900)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    with serve(tmp) as server:
        alice = server.client("alice")
        spec = dict(TINY_SPEC, certification=dict(TINY_SPEC["certification"], epsilon=0.2))
        done = alice.post("/jobs", json=spec).json()["id"]
        run_job_to_end(server, done, tmp / "runner.log")
        queued = alice.post(
            "/jobs", json=dict(TINY_SPEC, seed=7, name="queued-one", labels={"team": "vision"})
        )
        queued = queued.json()["id"]
        assert alice.get(f"/jobs/{done}").json()["status"] == "succeeded"
        # a sweep: the unpruned reference (vanilla) and LMP at two ratios, for the Pareto plot
        sweep_spec = dict(spec, sweep_methods=["vanilla", "lmp"], sweep_prune_ratios=[0.5, 0.7], name="sweep")
        sweep = alice.post("/jobs", json=sweep_spec).json()["id"]
        run_job_to_end(server, sweep, tmp / "runner-sweep.log")
        assert alice.get(f"/jobs/{sweep}").json()["status"] == "succeeded"
        yield {
            "server": server,
            "alice": alice,
            "bob": server.client("bob"),
            "done": done,
            "queued": queued,
            "sweep": sweep,
            "tmp": tmp,
        }
        alice.close()


def _pages(pdf: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page[^s]", pdf))


def test_html_report_has_every_section(env):
    r = env["alice"].get(f"/jobs/{env['done']}/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert page.startswith("<!doctype html>") and env["done"] in page
    sections = ("header", "summary", "parameters", "accuracy_pca", "pareto", "pca_epsilon", "sparsity")
    for section in (*sections, "epsilon", "margins", "examples"):
        assert f'<section id="{section}">' in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 6  # digits: examples available
    assert "A single variant: no Pareto plot" in page
    assert "<th>architecture</th><td>small_cnn</td>" in page and "<th>dataset</th><td>digits</td>" in page
    assert "<th>transform</th><td>brightness at strength 1, with delta drawn uniformly" in page
    assert "{&#x27;kind&#x27;" not in page  # the transform reads as words, not a dict
    assert re.search(r"<th>duration</th><td>[0-9.]+ s</td>", page)
    cert = env["alice"].get(f"/jobs/{env['done']}/certificate").json()
    certified = sum(s["certified"] for s in cert["samples"])
    assert f"<td>{certified}/{len(cert['samples'])}</td>" in page
    (variant,) = env["alice"].get(f"/jobs/{env['done']}").json()["summary"]["variants"]
    assert f"<td>{variant['accuracy']:.4f}</td>" in page  # test-set accuracy of the result
    frag = env["alice"].get(f"/jobs/{env['done']}/report", params={"embed": 1}).text
    assert frag.startswith('<div class="carcert-report">') and "<html" not in frag


def test_png_and_pdf(env):
    c, job = env["alice"], env["done"]
    for figure in ("accuracy_pca", "pca_epsilon", "sparsity", "epsilon", "margins", "examples"):
        r = c.get(f"/jobs/{job}/report.png", params={"figure": figure})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    r = c.get(f"/jobs/{job}/report.png", params={"figure": "pareto"})  # one variant: no trade-off
    assert r.status_code == 404 and "single variant" in r.json()["detail"]
    r = c.get(f"/jobs/{env['sweep']}/report.png", params={"figure": "pareto"})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG\r\n\x1a\n")
    r = c.get(f"/jobs/{job}/report.png", params={"figure": "nope"})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    pdf = c.get(f"/jobs/{job}/report.pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF") and _pages(pdf.content) == 7  # summary + 5 figures + examples
    assert "attachment" in pdf.headers["content-disposition"]


@pytest.mark.parametrize("suffix", ["report", "report.png", "report.pdf"])
def test_report_errors_are_problems(env, suffix):
    r = env["alice"].get(f"/jobs/{env['queued']}/{suffix}")
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["job_status"] == "queued" and "queued" in r.json()["detail"]
    r = env["bob"].get(f"/jobs/{env['done']}/{suffix}")  # another tenant's (cached) report: 404
    assert r.status_code == 404 and r.json()["title"] == "Not Found"
    r = httpx.get(f"{env['server'].url}/jobs/{env['done']}/{suffix}")
    assert r.status_code == 401


def test_examples_are_the_transformed_test_images(env):
    """The report's examples: x = the first certified test samples, and T(x, delta) = brightness
    x + 0.3 * delta clipped to [0, 1] (core.transforms PARAMETRIC), recomputed here independently."""
    from sklearn.datasets import load_digits

    from api.routers.report import EXAMPLE_DELTAS, build_examples
    from core.data import load_dataset
    from store.settings import Settings

    cert = env["alice"].get(f"/jobs/{env['done']}/certificate").json()
    results = [{"name": "lmp-0.50", "certificate": cert}]
    ex = build_examples(TINY_SPEC, results, Settings(data_roots=[env["tmp"]]))
    assert ex is not None and list(ex.deltas) == list(EXAMPLE_DELTAS)
    samples = [s for s in cert["samples"] if s["certified"]] + [
        s for s in cert["samples"] if not s["certified"]
    ]
    idx = [s["index"] for s in samples[:4]]
    split = load_dataset("digits", seed=0, train_subset=300)
    np.testing.assert_array_equal(ex.x, split.test_x[idx].numpy())
    assert set(np.round(ex.x.ravel() * 16, 4)) <= set(np.round(load_digits().data.ravel(), 4))  # values / 16
    for d, t in zip(ex.deltas, ex.transformed, strict=True):
        np.testing.assert_allclose(t, np.clip(ex.x + 0.3 * d, 0.0, 1.0), atol=1e-6)
    spec = dict(TINY_SPEC, dataset="artifact:0123")  # uploaded data is only resolved by the worker
    assert build_examples(spec, results, Settings(data_roots=[env["tmp"]])) is None


def test_dashboard_pages_are_served(env):
    url = env["server"].url
    r = httpx.get(f"{url}/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "Content-Security-Policy" in r.headers and "<script>" in r.text and 'id="jobs"' in r.text
    r = httpx.get(f"{url}/ui/jobs/{env['done']}")
    assert r.status_code == 200 and f'const JOB_ID = "{env["done"]}";' in r.text
    assert httpx.get(f"{url}/ui/jobs/%3Cscript%3E").status_code == 404


def _chromium(tmp: Path, url: str, *mode: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-quic",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp}",
        f"--window-size={SIZE[0]},{SIZE[1]}",
        "--virtual-time-budget=15000",
        *mode,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, timeout=120, text=True)


def _screenshot_checks(path: Path) -> None:
    from PIL import Image

    keep = os.environ.get("CARCERT_SCREENSHOT_DIR")  # to look at them: copies kept there
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)

    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.size == SIZE
        pixels = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10.0  # not blank
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 20  # text, badges, bars: many colours


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package: chromium)")
def test_job_list_in_headless_chromium(env, tmp_path):
    url = f"{env['server'].url}/ui#key={env['server'].keys['alice']}"
    shot = tmp_path / "jobs.png"
    run = _chromium(tmp_path / "profile", url, f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    _screenshot_checks(shot)
    dom = _chromium(tmp_path / "profile2", url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert f'data-id="{env["done"]}" data-status="succeeded"' in html
    assert f'data-id="{env["queued"]}" data-status="queued"' in html
    assert '<span class="badge succeeded">succeeded</span>' in html
    assert '<td class="name">queued-one <span class="label">team=vision</span></td>' in html
    assert "#key=" not in html and env["server"].keys["alice"] not in html  # key not left in the page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package: chromium)")
def test_job_page_in_headless_chromium(env, tmp_path):
    url = f"{env['server'].url}/ui/jobs/{env['done']}#key={env['server'].keys['alice']}"
    shot = tmp_path / "job.png"
    run = _chromium(tmp_path / "profile", url, f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    _screenshot_checks(shot)
    html = _chromium(tmp_path / "profile2", url, "--dump-dom").stdout
    assert f'id="job" class="card" data-id="{env["done"]}" data-status="succeeded"' in html
    assert '<tr class="cert"><td>lmp-0.50</td>' in html  # certificate summary row
    assert '<section id="margins">' in html and 'src="data:image/png;base64,' in html  # embedded report
    # the signed report link the page offers opens the report without a key
    link = re.search(r'<a id="share-link" href="([^"]+)"', html)
    assert link is not None, html[-3000:]
    url = link.group(1).replace("&amp;", "&")
    assert f"/shared/jobs/{env['done']}/report?expires=" in url
    r = httpx.get(url, timeout=60)
    assert r.status_code == 200 and '<section id="pca_epsilon">' in r.text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package: chromium)")
def test_report_in_headless_chromium(env, tmp_path):
    """The HTML report as a browser shows it (saved with the key, opened from a file): not blank,
    every figure an image that decodes (naturalWidth > 0)."""
    page = env["alice"].get(f"/jobs/{env['done']}/report").text
    check = (
        "<script>window.onload = () => { const ok = [...document.images].every(i => i.naturalWidth > 0);"
        " document.body.setAttribute('data-images', document.images.length + (ok ? ' ok' : ' broken')); };"
        "</script></body>"
    )
    (tmp_path / "report.html").write_text(page.replace("</body>", check))
    shot = tmp_path / "report.png"
    url = (tmp_path / "report.html").as_uri()
    run = _chromium(tmp_path / "profile", url, f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    _screenshot_checks(shot)
    dom = _chromium(tmp_path / "profile2", url, "--dump-dom").stdout
    assert 'data-images="6 ok"' in dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package: chromium)")
def test_dashboard_without_key_asks_for_it(env, tmp_path):
    html = _chromium(tmp_path / "profile", f"{env['server'].url}/ui", "--dump-dom").stdout
    assert "Paste your API key" in html and env["done"] not in html


def _example_rows(dom: str) -> list[tuple[str, list[str]]]:
    rows = re.findall(r'<tr class="example" data-certified="(\w+)">(.*?)</tr>', dom)
    return [(flag, re.findall(r"<td>(.*?)</td>", cells)) for flag, cells in rows]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian package: chromium)")
def test_sweep_report_in_headless_chromium_has_pareto_and_labelled_examples(env, tmp_path):
    """The sweep's report through its signed link, as a browser shows it (no API key): every picture
    decodes, including the Pareto plot, and the example rows name the test samples' labels,
    predictions and certified marks of the certificate (certified samples first)."""
    alice, job = env["alice"], env["sweep"]
    link = alice.post(f"/jobs/{job}/report/link").json()["url"]
    page = httpx.get(link, timeout=120).text
    check = (
        "<script>window.onload = () => { const ok = [...document.images].every(i => i.naturalWidth > 0);"
        " document.body.setAttribute('data-images', document.images.length + (ok ? ' ok' : ' broken')); };"
        "</script></body>"
    )
    (tmp_path / "report.html").write_text(page.replace("</body>", check))
    url = (tmp_path / "report.html").as_uri()
    shot = tmp_path / "report-sweep.png"
    run = _chromium(tmp_path / "profile", url, f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    _screenshot_checks(shot)
    dom = _chromium(tmp_path / "profile2", url, "--dump-dom").stdout
    assert 'data-images="7 ok"' in dom  # the 5 figures of every report, pareto and examples
    assert re.search(r'<section id="pareto"><h2>PCA vs sparsity \(Pareto\)</h2>\s*<img alt="PCA vs', dom)
    certs = alice.get(f"/jobs/{job}/certificate").json()["certificates"]
    assert sorted(c["name"] for c in certs) == ["lmp-0.50", "lmp-0.70", "vanilla-0.00"]
    samples = certs[0]["certificate"]["samples"]  # the examples come from the first certificate
    ordered = [x for x in samples if x["certified"]] + [x for x in samples if not x["certified"]]
    expected = [
        ("true" if x["certified"] else "false",
         [str(x["index"]), str(x["label"]), str(x["pred"]),
          "\u2713 certified" if x["certified"] else "\u2717 not certified"])
        for x in ordered[:4]
    ]  # fmt: skip
    assert _example_rows(dom) == expected
