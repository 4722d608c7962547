"""README's speed claims are the measured ones (issue 15): every ratio it quotes is in
docs/benchmarks.md, with the shape it was measured at, and nothing claims a GPU speed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _speed_paragraph() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Speed, as measured")
    return readme[start : readme.index("\n\n", start)]


def test_readme_claims_no_unmeasured_speed():
    readme = (ROOT / "README.md").read_text().lower()
    for claim in ("dense-mlp speed", "on cpu and gpu", "gpu speed", "fast on gpu"):
        assert claim not in readme, claim
    assert "nothing has\nbeen measured on a gpu" in _speed_paragraph().lower()


def test_readme_speed_ratios_are_in_benchmarks():
    bench = (ROOT / "docs" / "benchmarks.md").read_text()
    paragraph = _speed_paragraph()
    ratios = re.findall(r"\b[01]\.\d\d\b", paragraph)
    assert len(ratios) >= 6
    for ratio in ratios:
        assert ratio in bench, f"README quotes {ratio}, which docs/benchmarks.md does not"
    for shape in ("4096, 512, 1024, 8, 2", "4096, 512, 256, 64, 8", "8, 512, 1024, 8, 2"):
        assert shape in paragraph and shape in bench
