"""Progress bars: drawn with tqdm on a terminal, silent otherwise (so captured CLI output is unchanged)."""

from __future__ import annotations

import io

from patterndsl import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_terminal():
    stream = io.StringIO()
    with progress.bar(3, "work", stream=stream) as shown:
        for _ in range(3):
            shown.update()
    assert stream.getvalue() == ""
    assert not progress.enabled(stream)


def test_drawn_on_a_terminal():
    stream = _Terminal()
    with progress.bar(4, "timing", stream=stream) as shown:
        shown.update(2)
        shown.set_description_str("drawing")
        shown.update(2)
    text = stream.getvalue()
    assert "timing" in text and "drawing" in text and "/4" in text


def test_cli_bench_output_is_unchanged_when_captured(capsys):
    from patterndsl.cli import main

    assert main(["bench", "examples/streaming_llm.pdsl", "--seq", "64", "--repeat", "2", "--no-flex"]) == 0
    captured = capsys.readouterr()
    assert "patterndsl cpu is" in captured.out
    assert "it/s" not in captured.err and "%|" not in captured.err
