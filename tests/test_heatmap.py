"""Heatmaps a reader wants: masked cells grey and hatched (not the colour of a small weight), the query row
framed, the sentence in the title, one panel per head of the two-head layer. Checked on the pixels."""
import numpy as np
from matplotlib.image import imread

from symattn.app import docs
from symattn.app.run import run

DPI = 120  # outputs.save_figure's resolution


def _cell_colour(fig, ax, image, r, c):
    """Mean RGB of the cell's corner region (away from the number printed at its centre)."""
    x, y = ax.transData.transform((c - 0.3, r - 0.3)) * DPI / fig.dpi
    h = image.shape[0]
    patch = image[int(h - y) - 3:int(h - y) + 3, int(x) - 3:int(x) + 3, :3]
    return patch.reshape(-1, 3).mean(axis=0)


def test_masked_cells_differ_from_zero_weights(tmp_path):
    tokens = ("a", "$x^$", "c")
    P = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])  # (3, 3): row 0 sees a zero weight at (0, 1)
    visible = np.tril(np.ones((3, 3), bool)) | np.eye(3, k=1, dtype=bool)  # (0, 1) visible, (0, 2) masked
    fig = docs.heatmap_figure([("panel", P, visible)], tokens, query=1)
    docs.save_figure(fig, tmp_path / "h.png")
    image = imread(tmp_path / "h.png")
    ax = fig.axes[0]
    masked, zero = _cell_colour(fig, ax, image, 0, 2), _cell_colour(fig, ax, image, 0, 1)
    assert masked.min() > 0.55 and np.ptp(masked) < 0.08, masked  # light grey (with hatching)
    assert zero.mean() < 0.35 and zero[2] > zero[1] + 0.15, zero  # viridis(0): dark purple
    x, y = ax.transData.transform((-0.5, 1)) * DPI / fig.dpi  # the left edge of the query row's frame
    edge = image[int(image.shape[0] - y) - 2:int(image.shape[0] - y) + 3, int(x) - 2:int(x) + 3, :3].reshape(-1, 3)
    assert any(r > 0.8 and g < 0.3 and b < 0.3 for r, g, b in edge), edge  # red
    assert fig._suptitle.get_text() == '"a $x^$ c"' and not fig._suptitle.get_parse_math()
    assert "masked (never attended)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_one_panel_per_head_and_the_sentence_in_the_title(tmp_path, monkeypatch):
    figures = []
    real = docs.save_figure
    monkeypatch.setattr(docs, "save_figure", lambda fig, path: figures.append(fig) or real(fig, path))
    result = run("a b c", query="b", causal=True, d_model=2, d_k=2, say=lambda line: None, kernels=False,
                 plot=str(tmp_path / "heat.png"))
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3  # the single head, then the layer's heads 0 and 1
    assert [ax.get_title().startswith(t) for ax, t in zip(panels, ("Scaled", "two-head layer, head 0",
                                                                   "two-head layer, head 1"))] == [True] * 3
    assert fig._suptitle.get_text() == '"a b c"'
    image = imread(tmp_path / "heat.png")
    for ax, P in zip(panels, (result.P, *result.head_P)):
        masked, seen = _cell_colour(fig, ax, image, 0, 2), _cell_colour(fig, ax, image, 1, 0)
        assert P[0, 2] == 0 and np.ptp(masked) < 0.08 and masked.min() > 0.55  # causal: grey, hatched
        assert np.ptp(seen) > 0.15  # a visible weight is coloured


def test_every_picture_format_is_written_and_deterministic(tmp_path):
    """--plot takes .png, .pdf, .svg, .jpg/.jpeg; the SVG writer once refused the PNG metadata key "Software"
    (a traceback on every .svg). Same figure, same bytes (no dates or versions in PNG, PDF and SVG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from symattn.outputs import PICTURES, save_figure
    magic = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff"}
    assert set(PICTURES) == set(magic)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.arange(6.0).reshape(2, 3))
    for suffix in PICTURES:
        first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
        save_figure(fig, first), save_figure(fig, second)
        assert first.read_bytes().startswith(magic[suffix]), suffix
        if suffix in (".png", ".pdf", ".svg"):
            assert first.read_bytes() == second.read_bytes(), suffix
    plt.close(fig)
