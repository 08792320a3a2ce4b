"""Terminal output: tables whole at 80 columns and in a log, progress as lines in a log."""

from __future__ import annotations

import io

from rich.console import Console

from edgelm.console import StageProgress, console, print_table


def _console(width: int) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=False, color_system=None), buf


def test_table_drops_columns_instead_of_cutting_cells():
    header = ("artifact", "gate", "size MB", "p50 ms", "accuracy %", "top-1", "cosine", "est. device ms")
    rows = [["model.int8_dynamic.tflite", "PASS", "23.6", "4.81", "91.17", "0.9954", "0.99712", "3.9"]]
    con, buf = _console(80)
    left_out = print_table(con, "pixel8", header, rows, right=header[2:])
    text = buf.getvalue()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    assert "model.int8_dynamic.tflite" in text and "PASS" in text
    assert left_out and left_out[-1] == "est. device ms"  # the least important columns go first
    assert f"(not shown at this width: {', '.join(left_out)}; report.md has every column)" in text.replace("\n", " ")
    con, buf = _console(200)
    assert print_table(con, "pixel8", header, rows) == [] and "est. device ms" in buf.getvalue()
    assert "not shown" not in buf.getvalue()


def test_cli_console_keeps_a_long_line_whole_in_a_log():
    """The CLI's console soft-wraps: a sentence longer than the width stays one line (no word split in a log)."""
    buf = io.StringIO()
    con = console(file=buf, width=40, force_terminal=False, color_system=None)
    con.print("a long sentence that a log must keep on one line, whatever the width")
    assert buf.getvalue() == "a long sentence that a log must keep on one line, whatever the width\n"


def test_progress_in_a_log_is_one_line_per_stage_and_ends_at_its_total():
    con, buf = _console(80)
    with StageProgress(con) as progress:
        for i, stage in enumerate(("loading model", "exporting onnx", "exporting onnx", "writing")):
            progress(stage, i, 6)
        progress("done", 4, 4)
    assert buf.getvalue().splitlines() == [
        "[1/6] loading model",
        "[2/6] exporting onnx",
        "[4/6] writing",
        "[4/4] done",
    ]


def test_progress_in_a_log_shows_a_long_stage_moving_at_each_tenth():
    con, buf = _console(80)
    with StageProgress(con) as progress:
        for i in range(1, 41):
            progress("layer-local distillation", i, 40)
        progress("saving", 0, 1)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[2/40] layer-local distillation" and lines[-1] == "[1/1] saving"
    assert lines[1:-1] == [f"[{4 * k}/40] layer-local distillation" for k in range(1, 11)]
