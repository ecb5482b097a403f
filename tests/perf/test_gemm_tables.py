"""python -m pykernels.perf table --write: the small-M roofline share it prints and where it
writes (between each doc's markers, nothing else touched)."""
import random
import types

import pytest

from pykernels import perf
from pykernels.perf import __main__ as CLI
from pykernels.perf.gemm import Problem


@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (128, 4096, 7168), (128, 7168, 16384)])
def test_roofline_share_is_b_and_its_scales_at_the_sustained_hbm_rate(m, n, k):
    p = perf.part("h800")
    seconds = random.uniform(1e-6, 1e-4)
    pred = types.SimpleNamespace(problem=Problem("normal", 1, m, n, k), seconds=seconds)
    b_bytes = n * k + 4 * (-(-n // 128)) * (k // 128)          # e4m3 B and its float32 128 x 128 block scales
    sustained = p.hbm_bytes_per_s * p.hbm_efficiency           # the model's HBM rate (3.0 TB/s on the H800)
    assert CLI.roofline_share(pred, p) == pytest.approx(b_bytes / sustained / seconds, rel=1e-12)
    grouped = types.SimpleNamespace(problem=Problem("masked", 3, m, n, k), seconds=seconds)
    assert CLI.roofline_share(grouped, p) == pytest.approx(3 * b_bytes / sustained / seconds, rel=1e-12)


def test_write_between_replaces_only_the_marked_text(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("head\n<!-- t begin -->\nold table\n<!-- t end -->\ntail\n")
    CLI.write_between(doc, "<!-- t begin -->", "<!-- t end -->", "new table")
    assert doc.read_text() == "head\n<!-- t begin -->\nnew table\n<!-- t end -->\ntail\n"
    doc.write_text("head\n<!-- t begin -->\nno end marker\n")
    with pytest.raises(SystemExit, match="markers"):
        CLI.write_between(doc, "<!-- t begin -->", "<!-- t end -->", "new table")
    assert doc.read_text() == "head\n<!-- t begin -->\nno end marker\n"


@pytest.mark.parametrize("doc,begin,end", [(CLI.DOC, CLI.BEGIN, CLI.END),
                                           (CLI.GEMM_DOC, CLI.GEMM_BEGIN, CLI.GEMM_END)])
def test_the_docs_carry_the_markers_once(doc, begin, end):
    text = doc.read_text()
    assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end)
