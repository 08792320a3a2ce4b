"""Terminal output: tables whole at 80 columns and in a log, progress as lines in a log."""

from __future__ import annotations

import io

from rich.console import Console

from edgelm.console import StageProgress, print_table


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
    con, buf = _console(200)
    assert print_table(con, "pixel8", header, rows) == [] and "est. device ms" in buf.getvalue()


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
