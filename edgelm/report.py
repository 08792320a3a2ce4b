"""Reports: the one renderer of ``report.json`` / ``report.md``: an export run's per-artifact results
(:func:`render_markdown`) and the validation sections every ``edgelm validate`` (and the export's own host
check) rewrites (:func:`render_validation_markdown`, :func:`side_by_side_rows`), with one cell formatter
(:func:`fmt`) and one Markdown table writer (:func:`markdown_table`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgelm import hostinfo


@dataclass
class ArtifactResult:
    """Validation of one artifact on one runner.

    Attributes:
        file / format / quant / delegate: what was validated.
        size_mb: file size, MB (10^6 bytes); ``size_vs_fp32``: size / fp32 parameter bytes.
        fidelity: output of :func:`edgelm.validate.metrics.fidelity` (cosine, top-1, accuracy, max error).
        latency: p50/p90/mean/min in ms at batch 1 and the recipe's seq_len, ``threads`` CPU threads.
        speedup_vs_eager: PyTorch eager fp32 p50 / this artifact's p50 (same host, same threads, same input).
        peak_rss_mb: peak RSS of the runner process, MB.
        gates: ``{gate: {"value", "limit", "passed"}}``; ``passed``: all gates passed and no error.
        error: why the artifact could not be validated, if it could not.
        estimate: the cost model's figures for the target device (:mod:`edgelm.compress.estimate`):
            ``latency_ms``, ``peak_ram_mb``, ``weight_mb``, ``macs``, at the recipe's threads and seq_len.
        sparsity: share of heads / FFN neurons pruned before export.
        sentence_latency: per golden sentence at its real length: ``mean_ms``, ``p50_ms``, ``p90_ms``, ``rows``.
        exits: an early-exit cascade's exits on the golden set: ``share`` {layer: share 0-1}, ``mean_layers``.
    """

    file: str
    format: str
    quant: str
    delegate: str
    runner: str = "host"
    size_mb: float = 0.0
    size_vs_fp32: float = 0.0
    export_seconds: float = 0.0
    fidelity: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    threads: int | None = None
    speedup_vs_eager: float | None = None
    peak_rss_mb: float | None = None
    load_ms: float | None = None
    gates: dict = field(default_factory=dict)
    passed: bool = False
    error: str | None = None
    estimate: dict = field(default_factory=dict)
    sparsity: float = 0.0
    sentence_latency: dict | None = None
    exits: dict | None = None


@dataclass
class Report:
    """One ``edgelm export`` run: the device, the model, the reference, and every artifact's result."""

    device: str
    model: dict
    data: dict
    recipe: dict
    reference: dict
    artifacts: list[ArtifactResult] = field(default_factory=list)
    output_dir: str = ""
    wall_seconds: float = 0.0
    versions: dict = field(default_factory=dict)
    compression: dict | None = None
    search: dict | None = None
    adapters: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.artifacts) and all(a.passed for a in self.artifacts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def write(self, directory: Path) -> None:
        """Write ``report.json`` and ``report.md`` into ``directory``."""
        (directory / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        (directory / "report.md").write_text(render_markdown(self))


def fmt(value, spec: str = ".4f", none: str = "–") -> str:
    """A number for a report cell: ``format(value, spec)``, ``none`` for a missing value (None or NaN, which
    the pipeline uses for "not measured"), ``str(value)`` for what is not a number."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(rows: list[dict[str, str]]) -> list[str]:
    """A Markdown table (header, rule, one line per row) of display-string rows sharing their keys; [] if none."""
    if not rows:
        return []
    head = list(dict.fromkeys(k for r in rows for k in r))
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(r.get(h, "–") for h in head) + " |" for r in rows
    ]


def artifact_rows(report: Report) -> list[dict[str, str]]:
    """One row of display strings per artifact (shared by the Markdown report and the terminal table)."""
    rows = []
    for a in report.artifacts:
        f = a.fidelity
        rows.append(
            {
                "artifact": a.file,
                "format": a.format,
                "quant": a.quant,
                "pruned": f"{a.sparsity:.0%}",
                "size MB": fmt(a.size_mb, ".1f"),
                "× fp32": fmt(a.size_vs_fp32, ".2f"),
                "cosine": fmt(f.get("cosine_mean")),
                "top-1": fmt(f.get("top1_agreement"), ".3f"),
                "accuracy %": fmt(f.get("accuracy"), ".2f"),
                "max err": fmt(f.get("max_abs_error"), ".2e"),
                "p50 ms": fmt(a.latency.get("p50_ms"), ".2f"),
                "p90 ms": fmt(a.latency.get("p90_ms"), ".2f"),
                "× eager": fmt(a.speedup_vs_eager, ".1f"),
                "RSS MB": fmt(a.peak_rss_mb, ".0f"),
                "est. device ms": fmt(a.estimate.get("latency_ms"), ".1f"),
                "est. device RAM MB": fmt(a.estimate.get("peak_ram_mb"), ".0f"),
                "gate": "PASS" if a.passed else "FAIL",
            }
        )
    return rows


#: What an early-exit cascade's ``quant`` adds to its whole model's (the report's scheme column).
EARLY_EXIT_LABEL = " + early exit"


def whole_model_of(cascade: ArtifactResult, artifacts: list[ArtifactResult]) -> ArtifactResult | None:
    """The whole model an early-exit cascade was cut from: same format and scheme, no exits."""
    return next(
        (w for w in artifacts if w.format == cascade.format and cascade.quant == w.quant + EARLY_EXIT_LABEL), None
    )


def speedup_per_sentence(cascade: ArtifactResult, whole: ArtifactResult | None) -> float | None:
    """Whole model's mean latency per sentence / the cascade's (None when either was not measured)."""
    mine, full = cascade.sentence_latency or {}, (whole.sentence_latency if whole else None) or {}
    return full["mean_ms"] / mine["mean_ms"] if mine.get("mean_ms") and full.get("mean_ms") else None


def early_exit_markdown(artifacts: list[ArtifactResult]) -> list[str]:
    """The early-exit cascades beside their whole models (same format and scheme): threshold, accuracy,
    exits taken, and latency per golden sentence at its real length."""
    lines = [
        "## Early exit",
        "",
        "Each cascade runs its segments in order and stops at the first exit whose confidence passes the "
        "threshold, chosen on labeled data within the accuracy budget from the artifact's own exits. Latency per "
        "golden sentence at its real length (not the padded timing input), on this host's runner.",
        "",
    ]
    rows = []
    for a in artifacts:
        if not a.exits:
            continue
        whole = whole_model_of(a, artifacts)
        policy = a.exits.get("policy", {})
        share = a.exits.get("share") or {}
        mine, full = a.sentence_latency or {}, (whole.sentence_latency if whole else None) or {}
        op = "≥" if policy.get("confidence") == "max_prob" else "≤"
        rows.append(
            {
                "format": a.format,
                "scheme": a.quant.removesuffix(EARLY_EXIT_LABEL),
                "policy": f"{policy.get('confidence')} {op} {fmt(policy.get('threshold'), '.3f')}",
                "accuracy %": fmt(a.fidelity.get("accuracy"), ".2f"),
                "whole model %": fmt(whole.fidelity.get("accuracy") if whole else None, ".2f"),
                "exits (layer: share)": ", ".join(f"{k}: {v:.0%}" for k, v in share.items()),
                "mean layers": fmt(a.exits.get("mean_layers"), ".2f"),
                "mean ms": fmt(mine.get("mean_ms"), ".2f"),
                "p90 ms": fmt(mine.get("p90_ms"), ".2f"),
                "whole mean ms": fmt(full.get("mean_ms"), ".2f"),
                "speed-up": fmt(speedup_per_sentence(a, whole), ".2f"),
            }
        )
    return [*lines, *markdown_table(rows), ""]


def search_markdown(search: dict) -> list[str]:
    """The accuracy-budget search as Markdown: one row per candidate tried, the chosen one marked."""
    lines = [
        "## Accuracy-budget search",
        "",
        f"Budget: accuracy drop ≤ {search['max_accuracy_drop']} points against the fp32 model, size ≤ "
        f"{search['max_size_mb']} MB, estimated device latency ≤ {search['target_latency_ms']} ms and peak RAM ≤ "
        f"{search['max_peak_ram_mb']} MB. Candidates are tried fastest first (by the cost model) and the first "
        f"within every budget is chosen. Time limit {search['time_limit_s']:.0f} s"
        + (
            " — **reached: candidates after it were not tried**."
            if search.get("time_limit_reached")
            else f"; used {search['seconds']:.0f} s."
        ),
        "",
        "| format | pruned | scheme | est. device ms | size MB | accuracy % | drop | status | ran on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in search["candidates"]:
        where = c.get("ran_on") or {}
        ran_on = (
            f"{where['node']} (pid {where['pid']}, Ray)"
            if where
            else ("this process" if c.get("accuracy") is not None else "–")
        )
        lines.append(
            f"| {c['format']} | {c['sparsity']:.0%} | {c['label']} | {fmt(c.get('est_latency_ms'), '.1f')} | "
            f"{fmt(c.get('size_mb'), '.1f')} | {fmt(c.get('accuracy'), '.2f')} | {fmt(c.get('accuracy_drop'), '+.2f')} "
            f"| {'**chosen**' if c['status'] == 'chosen' else c['status']} | {ran_on} |"
        )
    return [*lines, ""]


def adapters_markdown(adapters: list[dict]) -> list[str]:
    """Further LoRA adapters served by the same base artifacts: one row per adapter and artifact."""
    lines = [
        "## Swappable adapters",
        "",
        "Each base artifact was run with these adapters' weights files swapped in, against each adapter's own "
        "PyTorch model (the adapter of the exported checkpoint is in the table above).",
        "",
        "| base artifact | adapter | weights file | KB | cosine | top-1 | accuracy % |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in adapters:
        f = a["fidelity"]
        lines.append(
            f"| {a['artifact']} | {a['name']} | {a['file']} | {a['size_bytes'] / 1e3:.1f} | "
            f"{fmt(f.get('cosine_mean'))} | {fmt(f.get('top1_agreement'))} | {fmt(f.get('accuracy'), '.2f')} |"
        )
    return [*lines, ""]


def render_markdown(report: Report) -> str:
    """The human report: summary, table of artifacts, gate details, reproduction command."""
    ref = report.reference
    lines = [
        f"# edgelm export report: {report.device}",
        "",
        f"- **Result:** {'all artifacts passed their gates' if report.passed else 'FAILED: see the gates below'}",
        f"- **Model:** `{report.model.get('source')}` ({report.model.get('kind')}, "
        f"{report.model.get('num_parameters', 0) / 1e6:.1f} M parameters, output `{report.model.get('output')}`)",
        f"- **Data:** {report.data.get('source')} ({report.data.get('count')} inputs"
        f"{', labeled' if report.data.get('labeled') else ''}), seq_len {report.recipe.get('seq_len')}",
        f"- **Reference:** PyTorch eager fp32 on this host: p50 {fmt(ref.get('eager_p50_ms'), '.2f')} ms at "
        f"{ref.get('threads')} thread(s)"
        + (f", accuracy {ref['accuracy']:.2f}%" if ref.get("accuracy") is not None else ""),
        *(
            [
                f"- **Host:** {hostinfo.describe(ref['host'])}. Speed-ups on this host (× eager) are not phone or "
                "board speed-ups: int8 kernels gain several times more on a CPU with int8 dot-product instructions."
            ]
            if ref.get("host")
            else []
        ),
        f"- **Wall time:** {report.wall_seconds:.1f} s",
        "",
        "## Artifacts (host runner)",
        "",
    ]
    lines += markdown_table(artifact_rows(report))
    lines += [
        "",
        "Latency: batch 1, the recipe's seq_len, p50/p90 over the timed runs after warm-up, measured on the host "
        "runner. Host latency is not device latency; the device budget is "
        f"{report.recipe.get('target_latency_ms')} ms. RSS: peak resident memory of the runner process "
        "(the ExecuTorch Python runtime loads torch, which dominates its figure).",
        "",
        "Estimates (est. device ms / RAM MB) come from the cost model for the target at the recipe's threads "
        "and seq_len, before export (`edgelm estimate`); the measured columns are this host's.",
        "",
    ]
    if report.compression:
        c = report.compression
        lines += [
            "## Compression",
            "",
            f"- structured pruning: {c.get('method')} at {c.get('sparsity', 0):.0%} of heads and FFN neurons; "
            f"encoder parameters {c.get('encoder_parameters_before')} → {c.get('encoder_parameters_after')}"
            + (
                f"; distilled {c.get('distill_epochs')} epoch(s) on {c.get('train')}"
                if c.get("distill_epochs")
                else " (no retraining: pass --train-data to distill)"
            ),
            "",
        ]
    if any(a.exits for a in report.artifacts):
        lines += early_exit_markdown(report.artifacts)
    if report.search:
        lines += search_markdown(report.search)
    if report.adapters:
        lines += adapters_markdown(report.adapters)
    lines += [
        "## Gates",
        "",
    ]
    for a in report.artifacts:
        lines.append(f"### {a.file}: {'PASS' if a.passed else 'FAIL'}")
        if a.error:
            lines.append(f"- error: {a.error}")
        for name, g in a.gates.items():
            op = "≤" if name.startswith("max") else "≥"
            lines.append(f"- {name}: {fmt(g['value'])} {op} {fmt(g['limit'])} → {'ok' if g['passed'] else 'FAILED'}")
        lines.append("")
    lines += ["## Reproduce", "", "```", report.data.get("command", ""), "```", ""]
    return "\n".join(lines)


def side_by_side_rows(doc: dict) -> list[dict[str, str]]:
    """One row per (artifact, runner) of validation.json: the side-by-side comparison across targets."""
    order = {"host": 0, "emulator": 1, "ssh": 2, "adb": 3}
    runners = sorted(doc.get("runners", {}).values(), key=lambda r: order.get(r.get("kind"), 9))
    names = list(dict.fromkeys(n for r in runners for n in r["artifacts"]))
    # a generative bundle's rows all get the decoder columns, also those skipped or failed (no fidelity)
    decoder = any("token_agreement" in (a.get("fidelity") or {}) for r in runners for a in r["artifacts"].values())
    # an early-exit bundle's rows all get the exits and the latency per sentence at its real length
    exits = any(a.get("exits") for r in runners for a in r["artifacts"].values())
    rows = []
    for name in names:
        for r in runners:
            a = r["artifacts"].get(name)
            if a is None:
                continue
            fid, lat, vs = a.get("fidelity") or {}, a.get("latency") or {}, a.get("vs_host") or {}
            p50 = ("functional only" if lat.get("emulated") else fmt(lat.get("p50_ms"), ".2f")) if lat else "–"
            row = {
                "artifact": name,
                "runner": r["runner"],
                "machine": str(a.get("machine") or "–"),
                "status": a["status"],
            }
            if decoder:  # a decoder: perplexity, greedy tokens, tokens/s
                speed = (a.get("speed") or {}).get("decode_tokens_per_s")
                row |= {
                    "perplexity": fmt(fid.get("perplexity"), ".3f"),
                    "ppl ratio": fmt(fid.get("perplexity_ratio"), ".4f"),
                    "agreement": fmt(fid.get("token_agreement"), ".2f"),
                    "prefix": fmt(fid.get("mean_prefix"), ".1f"),
                    "vs host": fmt(vs.get("token_agreement"), ".2f"),
                    "decode tok/s": "functional only" if lat.get("emulated") else fmt(speed, ".1f"),
                }
            else:
                row |= {
                    "accuracy %": fmt(fid.get("accuracy"), ".2f"),
                    "top-1": fmt(fid.get("top1_agreement"), ".4f"),
                    "cosine": fmt(fid.get("cosine_mean"), ".5f"),
                    "max error": fmt(fid.get("max_abs_error"), ".2e"),
                    "Δ vs host": fmt(vs.get("max_abs_diff"), ".2e"),
                    "top-1 vs host": fmt(vs.get("top1_agreement"), ".4f"),
                    "eval acc %": fmt((a.get("eval") or {}).get("accuracy"), ".2f"),
                    "p50 ms": p50,
                }
                if exits:
                    sent = (a.get("sentence_latency") or {}).get("mean_ms")
                    row |= {
                        "mean layers": fmt((a.get("exits") or {}).get("mean_layers"), ".2f"),
                        "ms/sentence": "functional only" if lat.get("emulated") else fmt(sent, ".2f"),
                    }
            rows.append(row)
    return rows


def render_validation_markdown(doc: dict) -> str:
    """The validation part of report.md: the side-by-side table, then one section per runner."""
    lines = [
        "## On-target validation: side by side",
        "",
        "Every artifact on every runner, against the PyTorch fp32 reference (accuracy, top-1 agreement, "
        "cosine, max error) and against the host's outputs of the same artifact (Δ vs host: max |difference|; "
        "top-1 vs host: share of inputs with the same class); for a generative model, perplexity and its ratio "
        "to the reference's, the share of golden prompts whose greedy tokens equal the reference's (agreement; "
        "prefix: mean tokens before the first difference), the share whose tokens equal the host's run of the "
        "same artifact (vs host) and decode tokens/s; for early-exit cascades, the mean encoder layers run and the "
        "mean latency per golden sentence at its real length. "
        "Emulated latency is functional only, never device speed.",
        "",
        *(markdown_table(side_by_side_rows(doc)) or ["(nothing)"]),
        "",
    ]
    for r in doc.get("runners", {}).values():
        verdict = "PASSED" if r.get("passed") else "FAILED"
        lines += [f"## Validation on {r['runner']}: {verdict}", ""]
        details = {
            "kind": r.get("kind"),
            "machine": r.get("machine"),
            "qemu CPU": r.get("qemu_cpu"),
            "started": r.get("started"),
            "threads": r.get("threads"),
            "warm-up / runs": f"{r.get('warmup')} / {r.get('runs')}",
            "eval set": (f"{r['eval_set']['source']} ({r['eval_set']['rows']} rows)" if r.get("eval_set") else None),
            "seconds": fmt(r.get("seconds"), ".1f"),
        }
        lines += [f"- {k}: {v}" for k, v in details.items() if v not in (None, "")]
        if r.get("dropped"):
            lines.append(f"- **runner dropped**: {r['dropped']} (results received before it are kept)")
        if r.get("emulated"):
            lines.append("- latency under emulation is functional only: it says the artifact runs, not how fast")
        lines += [
            "",
            "| artifact | status | checks | p50 ms | p90 ms | load ms | peak RSS MB | notes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, a in r["artifacts"].items():
            checks = a.get("checks", {})
            ok = sum(c["passed"] for c in checks.values())
            lat = a.get("latency") or {}
            emu = lat.get("emulated")
            notes = "; ".join(f"{k}: {c['detail']}" for k, c in checks.items() if not c["passed"])
            notes = notes or a.get("skipped") or ""
            lines.append(
                f"| {name} | {a['status']} | {ok}/{len(checks)} | "
                f"{'functional only' if emu else fmt(lat.get('p50_ms'), '.2f')} | "
                f"{'–' if emu else fmt(lat.get('p90_ms'), '.2f')} | {fmt(a.get('load_ms'), '.0f')} | "
                f"{fmt(a.get('peak_rss_mb'), '.0f')} | {notes.replace('|', '/')} |"
            )
        lines.append("")
    return "\n".join(lines)
