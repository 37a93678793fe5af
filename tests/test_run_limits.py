"""`symattn run`'s size limits by variant (symattn.limits.RUN_LIMITS): a size just over a variant's limit is
refused on the command line before any SymPy work, with one `symattn: error:` line naming the variant and its
limit (exit 2); a size at the limit passes the check. The expected values come from limits.RUN_LIMITS."""
import pytest

from symattn import limits
from symattn.app import inputs as inputs_module
from symattn.app import run as run_module
from symattn.app.cli import main
from symattn.errors import SizeTooLargeError
from symattn.limits import RUN_LIMITS

DOT = RUN_LIMITS["dot"]
HIDDEN = 2  # the additive score's hidden units in the CLI cases (a width: every width here is at least this)

# name -> (score, score mod or None, the flags that ask for it); every score whose limits are not the dot product's,
# with and without a score mod (a mask comes with some: masks do not change the limits)
VARIANTS = {
    "general": ("general", None, ["--score", "general"]),
    "general+mod": ("general", "softcap:5", ["--score", "general", "--score-mod", "softcap:5"]),
    "additive": ("additive", None, ["--score", "additive", "--hidden", str(HIDDEN)]),
    "additive+mod": ("additive", "relative-bias:1",
                     ["--score", "additive", "--hidden", str(HIDDEN), "--score-mod", "relative-bias:1"]),
    "cosine": ("cosine", None, ["--score", "cosine", "--mask", "window:2"]),
    "cosine+mod": ("cosine", "alibi", ["--score", "cosine", "--score-mod", "alibi", "--causal"]),
}


def _cells(score: str, mod) -> int:
    limit = RUN_LIMITS[score]
    return limit.mod_cells if mod else limit.cells


def _least_width(score: str) -> int:
    return HIDDEN if score == "additive" else 1


def _variant_words(score: str, mod) -> str:
    return f"over the worked example's limit for the {score} score" + (" with a score mod" if mod else "")


def _just_over(score: str, mod) -> tuple[int, int]:
    """(tokens, width) within the token and width limits whose product is the smallest over the cells limit."""
    limit, cells = RUN_LIMITS[score], _cells(score, mod)
    sizes = [(t, w) for t in range(1, limit.tokens + 1) for w in range(_least_width(score), limit.width + 1)
             if t * w > cells]
    return min(sizes, key=lambda tw: (tw[0] * tw[1], -tw[0]))


def _sentence(tokens: int) -> str:
    return " ".join(f"w{k}" for k in range(tokens))


def _refused(argv, capsys) -> str:
    """Run the CLI; it must exit 2 with one `symattn: error:` line, no traceback. Returns that line."""
    assert main(["run", "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("symattn: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_sympy_work(monkeypatch):
    """Refusals come before the example's exact matrices are built (and so before any derivation)."""
    def fail(*args, **kwargs):
        raise AssertionError("the run went on to SymPy work for a size over its limit")
    monkeypatch.setattr(run_module, "example", fail)
    monkeypatch.setattr(run_module, "derive", fail)
    monkeypatch.setattr(inputs_module, "_entry", fail)


def test_the_variants_limits_are_tighter_than_the_dot_products():
    for name, (score, mod, _) in VARIANTS.items():
        limit = RUN_LIMITS[score]
        assert limit.tokens <= DOT.tokens and limit.width <= DOT.width and _cells(score, mod) <= DOT.cells, name
        assert limit.mod_cells <= limit.cells  # a score mod never buys room


@pytest.mark.parametrize("name", VARIANTS)
def test_just_over_the_variants_cells_is_refused_naming_it(name, capsys, no_sympy_work):
    score, mod, flags = VARIANTS[name]
    tokens, width = _just_over(score, mod)
    line = _refused(["--sentence", _sentence(tokens), "--d-model", str(width), "--d-k", str(width), *flags], capsys)
    assert f"the sentence has {tokens} tokens at width {width}, {_variant_words(score, mod)}" in line
    assert f"tokens × width <= {_cells(score, mod)}" in line
    assert "shorten it or narrow it" in line and "symattn derive --indexed-only" in line


DEFAULT = len("The cat sat on the mat".split()), 4  # the documented default sentence: tokens, width


OVER_BY_DEFAULT = [name for name, (score, mod, _) in VARIANTS.items()
                   if DEFAULT[0] > RUN_LIMITS[score].tokens or DEFAULT[0] * DEFAULT[1] > _cells(score, mod)]


@pytest.mark.parametrize("name", OVER_BY_DEFAULT)
def test_the_default_sentence_counts_its_tokens(name, capsys, no_sympy_work):
    """No --sentence: the default sentence is checked like any other (it was counted as 0 tokens)."""
    score, mod, flags = VARIANTS[name]
    tokens, width = DEFAULT
    line = _refused([*flags, "--d-model", str(width), "--d-k", str(width)], capsys)
    assert f"the sentence has {tokens} tokens at width {width}, {_variant_words(score, mod)}" in line


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_default_run_narrows_its_widths_to_the_variants_limit(name, monkeypatch):
    """No sentence and no widths (`symattn run --score cosine`): the default sentence runs at the widest even
    width up to 4 that the variant's limit allows, instead of being refused."""
    score, mod, _ = VARIANTS[name]
    seen = {}
    monkeypatch.setattr(run_module, "example", lambda sentence, **kw: seen.update(kw))
    run_module._example(None, None, None, None, None, None,
                        dict(score=score, hidden=HIDDEN if score == "additive" else None, score_mod=mod))
    tokens, preferred = DEFAULT
    width = seen["d_model"]
    assert seen["d_k"] == seen["d_v"] == width and width <= preferred and width % 2 == 0
    assert tokens * width <= _cells(score, mod)
    assert width == preferred or tokens * (width + 2) > _cells(score, mod)  # the widest that fits


def test_additive_tokens_and_widths_hidden_units_included(capsys, no_sympy_work):
    limit = RUN_LIMITS["additive"]
    additive = ["--score", "additive", "--hidden", str(HIDDEN)]
    line = _refused(["--sentence", _sentence(limit.tokens + 1), "--d-model", str(HIDDEN), "--d-k", str(HIDDEN),
                     *additive], capsys)
    assert f"has {limit.tokens + 1} tokens" in line and f"({limit.tokens} tokens, " in line
    line = _refused(["--sentence", "a", "--d-model", str(limit.width + 1), "--d-k", "2", *additive], capsys)
    assert f"--d-model {limit.width + 1} is over the worked example's limit of {limit.width} for the additive" in line
    line = _refused(["--sentence", "a", "--d-model", "2", "--d-k", "2", "--score", "additive", "--hidden",
                     str(limit.width + 1)], capsys)
    assert f"--hidden {limit.width + 1} is over the worked example's limit of {limit.width} for the additive" in line
    assert "hidden units counting as a width" in line


def test_an_inputs_file_is_held_to_the_variants_limit(capsys, no_sympy_work):
    """The shipped file of the default sentence (6 tokens, width 4) through a variant that cannot take it."""
    tokens, width = DEFAULT
    score, mod, flags = VARIANTS["cosine+mod"]
    assert tokens * width > _cells(score, mod)
    line = _refused(["--inputs", "the-cat-sat", *flags], capsys)
    assert f"the file has {tokens} tokens at width {width}, {_variant_words(score, mod)}" in line


def test_run_from_python_refuses_before_any_work(no_sympy_work):
    tokens, width = _just_over("general", None)
    with pytest.raises(SizeTooLargeError, match=_variant_words("general", None)):
        run_module.run(_sentence(tokens), score="general", d_model=width, d_k=width, say=lambda line: None)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_size_at_the_variants_limit_passes_the_check_and_one_more_does_not(name):
    score, mod, _ = VARIANTS[name]
    limit, cells = RUN_LIMITS[score], _cells(score, mod)
    variant = dict(score=score, score_mod=mod)
    for tokens in range(1, limit.tokens + 1):
        width = min(limit.width, cells // tokens)
        if width < _least_width(score):
            continue
        hidden = dict(hidden=width) if score == "additive" else {}
        limits.check_run_sizes(tokens, width, width, width, **variant, **hidden)  # at the limit: accepted
        if width < limit.width:
            with pytest.raises(SizeTooLargeError, match=f"tokens × width <= {cells}"):
                limits.check_run_sizes(tokens, width + 1, width, width, **variant, **hidden)
    with pytest.raises(SizeTooLargeError, match=f"\\({limit.tokens} tokens, "):
        limits.check_run_sizes(limit.tokens + 1, 1, 1, 1, **variant, **(dict(hidden=1) if score == "additive" else {}))


@pytest.mark.parametrize("mod", ["alibi", "softcap:5", "relative-bias:2"])
def test_the_dot_products_limits_hold_with_a_score_mod(mod):
    """The dot product keeps its limits with any score mod (its worst corner stays well within the time)."""
    limits.check_run_sizes(DOT.tokens, DOT.cells // DOT.tokens, DOT.cells // DOT.tokens, 1, score_mod=mod)
    with pytest.raises(SizeTooLargeError, match=f"tokens × width <= {DOT.cells}"):
        limits.check_run_sizes(DOT.tokens, DOT.cells // DOT.tokens + 1, 1, 1, score_mod=mod)


def test_a_bad_variant_gets_its_own_error_not_a_size_limit(capsys):
    """The additive score without hidden units, or an unknown score from Python, is held to the dot product's
    limits here, so the spec's error (naming the missing or bad field) comes first."""
    limits.check_run_sizes(6, 4, 4, 4, score="additive")
    limits.check_run_sizes(6, 4, 4, 4, score="bogus")
    assert "hidden" in _refused(["--score", "additive"], capsys)


def test_the_memory_check_reads_meminfo_only_for_large_arrays(monkeypatch):
    """Arrays up to limits.SMALL_BYTES pass without reading /proc/meminfo (14 µs a call on the numeric API's
    path); a larger one over half the memory available is still refused naming what and how much."""
    def unreadable():
        raise AssertionError("read /proc/meminfo for a small array")
    monkeypatch.setattr(limits, "available_bytes", unreadable)
    limits.check_memory(limits.SMALL_BYTES, "a small array", "-")
    monkeypatch.setattr(limits, "available_bytes", lambda: 3 * limits.SMALL_BYTES)
    with pytest.raises(SizeTooLargeError, match="the big array would need 128.0 MiB"):
        limits.check_memory(2 * limits.SMALL_BYTES, "the big array", "-")
