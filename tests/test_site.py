"""The documentation site (docs/): built with warnings as errors into a temporary folder, math offline, pages
opened in headless Chromium (math typeset by MathJax, nothing raw left, a screenshot that is not blank)."""
from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
sys.dont_write_bytecode, _write = True, sys.dont_write_bytecode  # no __pycache__ in docs/
import symattn_docs  # noqa: E402  (the site's extension: which pages are generated derivations)
sys.dont_write_bytecode = _write

GENERATED = symattn_docs.generated_pages(DOCS)
GALLERY = sorted(p.stem for p in (DOCS / "gallery").glob("*.md"))
PAGES = ["index", "getting-started", "tutorial", "derivations", "api", "cli", "benchmarks", *GENERATED,
         *(f"gallery/{g}" for g in GALLERY)]
BROWSED = ["tutorial", GENERATED[0], "gallery/additive"]  # built-time output, a committed page, a variant


def _tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def _require(present: bool, message: str) -> None:
    """Skip where a tool is missing on a developer's machine; fail under CI (.ci/run installs everything)."""
    if not present:
        if os.environ.get("CI"):
            pytest.fail(f"{message}: the site's tests cannot run on CI without it")
        pytest.skip(message)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Build the site as the README says, into a temporary folder; the source tree must stay untouched."""
    _require(importlib.util.find_spec("sphinx") is not None, 'Sphinx is not installed (pip install -e ".[docs]"; '
             'the test extra includes it)')
    out = tmp_path_factory.mktemp("site")
    before = _tree(DOCS)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    build = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                            "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"sphinx-build -W failed:\n{build.stdout}\n{build.stderr}"
    assert _tree(DOCS) == before, "building the site wrote into docs/"
    return out / "html"


def test_every_page_is_built(site):
    missing = [p for p in PAGES if not (site / f"{p}.html").is_file()]
    assert not missing
    assert GENERATED, "no generated derivation page (docs/*.md written by `symattn generate --all`) was found"


def test_math_is_offline(site):
    """No page or style sheet loads anything from another host; MathJax and its fonts come from _static."""
    resource = re.compile(r'<(?:script|img|iframe|source|link)\b[^>]*?\b(?:src|href)="((?:https?:)?//[^"]*)"')
    for page in PAGES:
        html = (site / f"{page}.html").read_text(encoding="utf-8")
        assert "https://cdn" not in html and not resource.findall(html), page
        if 'class="math notranslate nohighlight"' in html:  # pages with math load the bundled MathJax
            assert re.search(r'<script defer="defer" src="(\.\./)?_static/mathjax/tex-chtml\.js"', html), page
    for css in (site / "_static").glob("*.css"):
        assert not re.search(r"(url\(|@import)\s*['\"]?(https?:)?//", css.read_text(encoding="utf-8")), css.name
    assert (site / "_static/mathjax/tex-chtml.js").is_file()
    assert list((site / "_static/mathjax/output/chtml/fonts/woff-v2").glob("*.woff"))


def test_generated_pages_keep_every_formula(site):
    """Each ```math block of a generated derivation page becomes one display-math element, each inline formula
    ($...$ or GitHub's $`...`$) one inline-math element: none is left as text or code."""
    inline = re.compile(r"\$`[^`\n]+`\$|(?<![\\$])\$(?![\s$])[^$\n]*?(?<![\s\\])\$")
    for page in GENERATED:
        source = (DOCS / f"{page}.md").read_text(encoding="utf-8")
        blocks = re.findall(r"^```math\n.*?\n```$", source, re.M | re.S)
        formulas = inline.findall(re.sub(r"^```.*?^```$", "", source, flags=re.M | re.S))
        html = (site / f"{page}.html").read_text(encoding="utf-8")
        assert blocks and html.count('<div class="math notranslate nohighlight">') == len(blocks), page
        assert formulas and html.count('<span class="math notranslate nohighlight">') == len(formulas), page
        assert "$<code" not in html and "$`" not in html, page


def test_gallery_describes_masks_with_mathematics(site):
    """A mask's description (symattn.masks) is typeset like every other explanation, not ASCII prose."""
    math = r'<span class="math notranslate nohighlight">\\\((.*?)\\\)</span>'
    window = (site / "gallery/window.html").read_text(encoding="utf-8")
    assert re.search(f"query {math} sees keys {math} to {math} \\(a causal sliding window\\)", window)
    causal = (site / "gallery/causal.html").read_text(encoding="utf-8")
    assert re.search(f"only when {math}", causal) and "j &lt;= i" not in causal


def test_tutorial_weights_match_the_numpy_reference(site):
    """The weights table computed at build time equals an independent NumPy softmax of the example's Q, K."""
    from symattn.app.example import example
    ex = example()
    Q, K = (np.array(M, dtype=float) for M in (ex.Q, ex.K))
    S = Q @ K.T / np.sqrt(K.shape[1])  # (n, n)
    P = np.exp(S - S.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    html = (site / "tutorial.html").read_text(encoding="utf-8")
    rows = [re.sub(r"<[^>]+>", " ", row).split() for row in re.findall(r"<tr\b[^>]*>(.*?)</tr>", html, re.S)]
    i = ex.query
    for j, token in enumerate(ex.tokens):
        assert [str(j), token, f"{S[i, j]:.4f}", f"{P[i, j]:.4f}"] in rows, (j, token)


def test_references_cover_the_api_and_the_command_line(site):
    api = (site / "api.html").read_text(encoding="utf-8")
    for name in ("attention", "attention_vjp", "attention_backward", "attention_weights", "multihead_attention",
                 "multihead_attention_backward", "AttentionSpec", "MultiHeadSpec", "derive", "verify"):
        assert f'id="symattn.{name}"' in api, name
    for name in ("masks.sliding_window", "masks.prefix_lm", "masks.and_masks", "mods.alibi", "mods.softcap"):
        assert f'id="symattn.symbolic.{name}"' in api, name
    from symattn.app.cli import build_parser
    cli = (site / "cli.html").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if a.choices and a.dest == "command")
    for command, parser in sub.choices.items():
        assert f'id="{command}"' in cli, command
        for option in (s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"):
            # (sphinx-argparse leaves -h/--help out; it was found only inside a group title before)
            assert option in cli, (command, option)


# -- in a real browser ------------------------------------------------------------------------------------------

class _VisibleText(HTMLParser):
    """Text a reader sees: outside scripts, styles, code and MathJax's typeset output (none of those is void)."""

    HIDDEN = {"script", "style", "pre", "code", "mjx-container", "title", "textarea"}

    def __init__(self):
        super().__init__()
        self.hidden, self.depth, self.parts = None, 0, []

    def handle_starttag(self, tag, attrs):
        if self.hidden is None and tag in self.HIDDEN:
            self.hidden, self.depth = tag, 1
        elif tag == self.hidden:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == self.hidden:
            self.depth -= 1
            self.hidden = self.hidden if self.depth else None

    def handle_data(self, data):
        if self.hidden is None:
            self.parts.append(data)


def visible_text(html: str) -> str:
    parser = _VisibleText()
    parser.feed(html)
    return "".join(parser.parts)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    _require(path is not None, "Debian's chromium is not on PATH (apt-get install chromium; .ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def served(site):
    """The built site over HTTP on the loopback address, as a reader's browser would get it."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _browse(chromium: str, url: str, folder: Path) -> tuple[str, Path]:
    """The page's DOM after its scripts ran, and a screenshot; every other host is unreachable (offline)."""
    folder.mkdir()
    shot = folder / "page.png"
    run = subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                          f"--user-data-dir={folder / 'profile'}", "--window-size=1200,900",
                          "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                          "--virtual-time-budget=8000", f"--screenshot={shot}", "--dump-dom", url],
                         env={**os.environ, "HOME": str(folder)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "</html>" in run.stdout, (url, run.stderr[-2000:])
    return run.stdout, shot


@pytest.fixture(scope="module")
def browsed(site, served, chromium, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    with ThreadPoolExecutor(len(BROWSED)) as pool:
        results = pool.map(lambda k_page: _browse(chromium, f"{served}/{k_page[1]}.html", folder / str(k_page[0])),
                           enumerate(BROWSED))
        return dict(zip(BROWSED, results))


@pytest.mark.parametrize("page", BROWSED)
def test_browser_typesets_every_formula(site, browsed, page):
    dom, _ = browsed[page]
    built = (site / f"{page}.html").read_text(encoding="utf-8")
    formulas = len(re.findall(r'<(?:div|span) class="math notranslate nohighlight">', built))
    assert formulas > 0
    assert len(re.findall(r"<mjx-container\b", dom)) == formulas, "MathJax did not typeset every formula"
    assert "<mjx-merror" not in dom, "MathJax reported a TeX error"
    before, text = visible_text(built), visible_text(dom)
    assert "\\[" in before and "\\[" not in text, "raw display math left as visible text"  # before: the check bites
    for raw in ("$$", "\\frac", "\\begin", "\\sum"):
        assert raw not in text, f"raw {raw!r} left as visible text on {page}"
    assert len(text.split()) > 50, "the page shows (almost) no text"


@pytest.mark.parametrize("page", BROWSED)
def test_screenshot_is_not_blank(browsed, page):
    from PIL import Image  # matplotlib's image library
    with Image.open(browsed[page][1]) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=float) / 255  # (height, width, 3) in [0, 1]
    assert pixels.shape[:2] == (900, 1200)
    assert pixels.std() > 0.05, "the page looks blank"
    dark = (pixels.mean(axis=2) < 0.5).mean()
    assert 0.005 < dark < 0.5, f"{dark:.1%} of the pixels are dark: not a page of text and formulas"
