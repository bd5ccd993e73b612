"""benchmarks/compare.py's verdicts: the RSS check fails when a receiver is over its limit."""

from __future__ import annotations

import pytest

from benchmarks import compare


@pytest.mark.parametrize(("rss_mib", "status"), [(100, 0), (300, 1)])
def test_rss_check_exit_status_follows_the_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], rss_mib: int, status: int
) -> None:
    seen: list[tuple[str, list[str] | None]] = []

    def run_once(kind: str, case: compare.Case, *, extra: list[str] | None = None) -> compare.Run:
        seen.append((kind, extra))
        return compare.Run(seconds=1.0, max_rss=rss_mib << 20)

    monkeypatch.setattr(compare, "run_once", run_once)
    assert compare.rss_check(("cref", "native", "pure")) == status
    assert seen == [
        ("native", ["--max-queued", str(64 << 20)]),
        ("pure", ["--max-queued", str(64 << 20)]),
    ]
    out = capsys.readouterr()
    assert out.out.count("OVER" if status else ": ok") == 2
    assert ("native, pure" in out.err) == bool(status)


def test_sizes_use_the_one_parser() -> None:
    assert compare.Case.parse("4K:4:null", None).packet == 4 << 10
    assert compare.Case.parse("1MiB:16:pipe", 1 << 30).size == 1 << 30
