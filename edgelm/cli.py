"""The ``edgelm`` command line (typer + rich): parsing, progress and tables only; the work is in
:mod:`edgelm.pipeline`. Errors from edgelm are printed on one line without a traceback; bad input exits 2,
an artifact that misses its gates exits 1."""

from __future__ import annotations

import functools
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import edgelm
from edgelm.errors import EdgeLMError

app = typer.Typer(
    name="edgelm",
    help="Compress, export and validate language models for phones and boards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
devices_app = typer.Typer(help="List device profiles, or show one.", invoke_without_command=True)
app.add_typer(devices_app, name="devices")

out_console = Console()
#: the report columns shown in the terminal summary (report.md has them all)
TERMINAL_COLUMNS = ("artifact", "size MB", "cosine", "top-1", "accuracy %", "p50 ms", "× eager", "RSS MB", "gate")


def _err_console() -> Console:
    """A console on a duplicate of fd 2, so that it still reaches the terminal while the pipeline
    captures fd 1/2 of noisy converters into log files."""
    return Console(file=os.fdopen(os.dup(2), "w", buffering=1), stderr=True)


def handle_errors(func):
    """Print EdgeLMError as one line (``error: ...``) and exit with its code (2 for bad input)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EdgeLMError as exc:
            Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            Console(stderr=True).print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None

    return wrapper


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@app.command()
@handle_errors
def export(
    device: Annotated[str, typer.Option("--device", "-d", help="Device profile name (see `edgelm devices`) or a .toml path.")],
    model: Annotated[str, typer.Option("--model", "-m", help="'default' (packaged all-MiniLM-L6-v2) or a Hugging Face checkpoint directory.")] = "default",
    data: Annotated[Optional[str], typer.Option("--data", help="Eval data: .tsv/.csv/.jsonl with a text column and an optional label column. Default: built-in probe sentences.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output root; artifacts go to OUT/<device>/.")] = Path("dist"),
    fmt: Annotated[Optional[list[str]], typer.Option("--format", "-f", help="Formats to export (repeat or comma-separate): executorch, tflite, onnx. Default: the profile's.")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", "-q", help="Quantization for every format (fp32, int8_dynamic) or FORMAT=SCHEME,...")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="Max sequence length in tokens (default: the profile's latency_seq_len).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Runtime CPU threads (default: the profile's; capped at this host's cores when validating here).")] = None,
    text_column: Annotated[Optional[str], typer.Option("--text-column", help="Name of the text column in --data.")] = None,
    label_column: Annotated[Optional[str], typer.Option("--label-column", help="Name of the label column in --data.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use at most this many rows of --data.")] = None,
):
    """Export the model for a device in every format its profile allows, validate each artifact against
    PyTorch fp32 on this host, and write OUT/<device>/ with a manifest, golden set and report."""
    from edgelm.pipeline import export_for_device, prepare

    prepared = prepare(device, formats=_split(fmt), quant=quant, seq_len=seq_len, threads=threads)
    err = _err_console()
    command = "edgelm " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    def show_recipe(recipe) -> None:
        t = Table(title=f"recipe for {recipe.device}: seq_len {recipe.seq_len}, batch {recipe.batch}, "
                        f"{recipe.threads} threads", title_justify="left")
        for col in ("artifact", "delegate", "gates"):
            t.add_column(col, no_wrap=col == "artifact")
        for p in recipe.plans:
            g = p.gates
            t.add_row(p.artifact_name + (" (+ 8-bit embeddings)" if p.quant.embedding_bits else ""), p.delegate,
                      f"cosine ≥ {g.min_cosine}, top-1 ≥ {g.min_top1_agreement}, "
                      f"acc drop ≤ {g.max_accuracy_drop} pt, ≤ {g.max_size_mb:g} MB")
        err.print(t)

    show_recipe(prepared[1])
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=False) as bar:
        task = bar.add_task("starting", total=None)

        def progress(desc: str, done: int, total: int) -> None:
            bar.update(task, description=desc, completed=done, total=total)

        report = export_for_device(
            device, model=model, data=data, out=out, formats=_split(fmt), quant=quant, seq_len=seq_len,
            threads=threads, text_column=text_column, label_column=label_column, limit=limit,
            progress=progress, command=command, prepared=prepared,
        )
    from edgelm.report import artifact_rows

    rows = artifact_rows(report)
    # only the columns that say something for this model (no top-1/accuracy for an embedding model)
    cols = [k for k in TERMINAL_COLUMNS if any(r[k] != "–" for r in rows)]
    rows = [{k: r[k] for k in cols} for r in rows]
    table = Table(title=f"{report.device}: {report.output_dir}  (PyTorch eager fp32 p50 "
                        f"{report.reference['eager_p50_ms']:.1f} ms, {report.reference['threads']} thread(s))",
                  title_justify="left")
    for col in rows[0]:
        table.add_column(col, justify="left" if col == "artifact" else "right", no_wrap=col == "artifact")
    for r in rows:
        style = "green" if r["gate"] == "PASS" else "red"
        table.add_row(*[r[c] if c != "gate" else f"[{style}]{r[c]}[/]" for c in r])
    out_console.print(table)
    for a in report.artifacts:
        if not a.passed:
            failed = [k for k, g in a.gates.items() if not g["passed"]]
            out_console.print(f"[red]{a.file} failed[/]: {a.error or ', '.join(failed)}")
    out_console.print(f"report: {Path(report.output_dir) / 'report.md'}  ({report.wall_seconds:.0f} s)")
    if not report.passed:
        raise typer.Exit(1)


@devices_app.callback()
@handle_errors
def devices(ctx: typer.Context):
    """Print the device profiles as a table."""
    if ctx.invoked_subcommand is not None:
        return
    from edgelm.profiles import all_profiles

    t = Table(title="edgelm device profiles")
    for col in ("name", "SoC", "cores", "RAM MB", "formats", "max MB", "ms@seq", "runner"):
        t.add_column(col, overflow="fold", no_wrap=col == "name")
    for p in all_profiles():
        b = p.budgets
        t.add_row(p.name, p.hardware.soc, str(p.hardware.cpu_cores), str(p.hardware.ram_mb),
                  ", ".join(p.quantization), f"{b.max_artifact_mb:g}",
                  f"{b.target_latency_ms:g}@{b.latency_seq_len}", p.validation.runner)
    out_console.print(t)


@devices_app.command("show")
@handle_errors
def devices_show(name: Annotated[str, typer.Argument(help="Profile name, e.g. pixel8.")]):
    """Print one device profile in full."""
    from edgelm.profiles import load_profile

    p = load_profile(name)
    t = Table(title=f"{p.name}: {p.display_name} ({p.kind})", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    for section, values in p.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                t.add_row(f"{section}.{k}", ", ".join(map(str, v)) if isinstance(v, list) else str(v))
        else:
            t.add_row(section, str(values))
    out_console.print(t)


@app.command()
@handle_errors
def recipe(
    device: Annotated[str, typer.Option("--device", "-d", help="Device profile name or .toml path.")],
    fmt: Annotated[Optional[list[str]], typer.Option("--format", "-f")] = None,
    quant: Annotated[Optional[str], typer.Option("--quant", "-q")] = None,
    seq_len: Annotated[Optional[int], typer.Option("--seq-len")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads")] = None,
):
    """Print the recipe (as JSON) that `edgelm export` would follow for a device."""
    import json

    from edgelm.profiles import load_profile
    from edgelm.recipe import make_recipe

    r = make_recipe(load_profile(device), formats=_split(fmt), quant=quant, seq_len=seq_len, threads=threads)
    out_console.print_json(json.dumps(r.to_dict()))


@app.command()
def version():
    """Print edgelm's version."""
    out_console.print(edgelm.__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
