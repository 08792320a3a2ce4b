"""Recipe: what to do for one device, derived by a pure function from a profile and CLI overrides.

A recipe lists the formats to export, a :class:`~exporters.QuantSpec` and delegate per format, the input
shapes, and the acceptance gates that validation applies to each artifact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import exporters
from edgelm import schemes
from edgelm.errors import RecipeError
from edgelm.profiles import DeviceProfile
from exporters import QuantSpec, decoder, decoder_tflite

#: Default maximum task-accuracy drop against the PyTorch fp32 model, in percentage points.
DEFAULT_MAX_ACCURACY_DROP = 1.0


@dataclass(frozen=True)
class Gates:
    """Acceptance gates for one artifact.

    Attributes:
        min_cosine: mean cosine similarity of outputs to the PyTorch fp32 reference, in [-1, 1] (embedding
            models; :attr:`edgelm.tasks.Task.gates` says which gates judge which task).
        min_top1_agreement: share of inputs whose arg-max class equals the reference's (classifiers), [0, 1].
        max_accuracy_drop: task accuracy drop against the fp32 reference, percentage points (classifiers,
            with labels).
        max_size_mb: artifact file size budget, MB (10^6 bytes).
        max_perplexity_ratio: the artifact's perplexity over the reference's (generators).
        min_token_agreement: share of golden prompts whose greedy tokens equal the reference's (generators).
    """

    min_cosine: float
    min_top1_agreement: float
    max_accuracy_drop: float
    max_size_mb: float
    max_perplexity_ratio: float = 1.05
    min_token_agreement: float = 0.5


@dataclass(frozen=True)
class FormatPlan:
    """One artifact to produce: format, quantization, delegate, and its gates."""

    format: str
    quant: QuantSpec
    delegate: str
    gates: Gates

    @property
    def artifact_name(self) -> str:
        return f"model.{self.quant.scheme}{exporters.suffix(self.format)}"


#: Pruning ratios the accuracy-budget search considers (up to the recipe's ``max_sparsity``).
SEARCH_SPARSITIES = (0.5, 0.3, 0.0)


@dataclass(frozen=True)
class Recipe:
    """Everything the pipeline needs to know for one device: nothing downstream reads the profile again.

    Attributes:
        device: profile name (the output folder's name); display_name: the device's name for people.
        seq_len: max sequence length in tokens; inputs are [batch, seq_len] int ids and mask.
        threads: CPU threads the runtimes use on the target.
        plans: one :class:`FormatPlan` per artifact, in the profile's order.
        batch: batch size the artifacts are exported and timed at (1).
        sparsity: share of heads and FFN neurons pruned before export (0: none).
        target_latency_ms / max_peak_ram_mb / max_artifact_mb: the device's budgets (ms at ``seq_len``,
            MB, MB), reported beside host measurements and used by the search.
        hardware: the profile's hardware figures (cores, GOP/s, GB/s) for the cost model.
        gates_by_scheme: the gates each scheme would get here (the search tries other schemes).
        max_sparsity / sparsities: the search space of ``--search`` (pruning ratios tried, most first).
        profile: the profile as plain data, written into the manifest (runners read its [validation]).
    """

    device: str
    seq_len: int
    threads: int
    plans: list[FormatPlan] = field(default_factory=list)
    batch: int = 1
    sparsity: float = 0.0
    target_latency_ms: float = 0.0
    max_peak_ram_mb: float = 0.0
    max_artifact_mb: float = 0.0
    hardware: dict = field(default_factory=dict)
    gates_by_scheme: dict[str, Gates] = field(default_factory=dict)
    max_sparsity: float = 0.5
    sparsities: tuple[float, ...] = SEARCH_SPARSITIES
    display_name: str = ""
    profile: dict = field(default_factory=dict, repr=False)

    def gates_for(self, scheme: str) -> Gates:
        """The gates of a ``scheme`` artifact on this device. Raises RecipeError for an unknown scheme."""
        if scheme not in self.gates_by_scheme:
            schemes.get(scheme)  # raises for an unknown scheme
            raise RecipeError(f"the recipe has no gates for {scheme!r}")
        return self.gates_by_scheme[scheme]

    def to_dict(self) -> dict:
        """The recipe as written to the manifest and report (without the profile, which the manifest keeps
        under ``device``)."""
        d = asdict(self)
        d.pop("profile")
        for plan, pd in zip(self.plans, d["plans"], strict=True):
            pd["artifact"] = plan.artifact_name
        return d


def parse_quant_override(value: str | None, formats: list[str]) -> dict[str, str]:
    """``"int8_dynamic"`` (every format) or ``"onnx=fp32,tflite=int8_dynamic"`` -> ``{format: scheme}``.
    Raises RecipeError for a malformed value or a format not being exported."""
    if not value:
        return {}
    if "=" not in value:
        return {fmt: value.strip() for fmt in formats}
    out = {}
    for part in value.split(","):
        fmt, sep, scheme = part.partition("=")
        fmt, scheme = fmt.strip(), scheme.strip()
        if not sep or not scheme:
            raise RecipeError(f"--quant {value!r}: write SCHEME or FORMAT=SCHEME[,FORMAT=SCHEME]")
        if fmt not in formats:
            raise RecipeError(f"--quant names {fmt!r}, which is not among the formats exported ({', '.join(formats)})")
        out[fmt] = scheme
    return out


def gates_for(profile: DeviceProfile, scheme: str, max_accuracy_drop: float | None = None) -> Gates:
    """The acceptance gates of one artifact: the scheme's defaults (:data:`edgelm.schemes.TABLE`), the profile's
    ``[gates]`` overrides, ``max_accuracy_drop`` (points) when given, and the profile's size budget."""
    sch = schemes.get(scheme)
    min_cos, min_top1 = sch.min_cosine, sch.min_top1_agreement
    g = profile.gates
    drop = (
        max_accuracy_drop
        if max_accuracy_drop is not None
        else (g.max_accuracy_drop if g.max_accuracy_drop is not None else DEFAULT_MAX_ACCURACY_DROP)
    )
    return Gates(
        min_cosine=g.min_cosine if g.min_cosine is not None else min_cos,
        min_top1_agreement=g.min_top1_agreement if g.min_top1_agreement is not None else min_top1,
        max_accuracy_drop=float(drop),
        max_size_mb=profile.budgets.max_artifact_mb,
        max_perplexity_ratio=sch.max_perplexity_ratio,
        min_token_agreement=sch.min_token_agreement,
    )


def _delegate(profile: DeviceProfile, fmt: str) -> str:
    plugin = exporters.get(fmt)
    listed = getattr(profile.runtimes, plugin.profile_runtimes, [])
    supported = plugin.delegates
    for name in listed:
        if name in supported:
            return name
    raise RecipeError(
        f"device {profile.name!r} lists no {fmt} backend edgelm can target "
        f"(profile: {', '.join(listed) or 'none'}; edgelm: {', '.join(supported)}); choose another --format"
    )


def _threads(profile: DeviceProfile, threads: int | None) -> int:
    """The runtime threads: ``threads`` or the profile's ``validation.threads``. Raises RecipeError below 1."""
    n = profile.validation.threads if threads is None else int(threads)
    if n < 1:
        raise RecipeError(f"--threads {n}: use 1 or more")
    return n


def make_recipe(
    profile: DeviceProfile,
    *,
    formats: list[str] | None = None,
    quant: str | None = None,
    seq_len: int | None = None,
    threads: int | None = None,
    sparsity: float | None = None,
    max_accuracy_drop: float | None = None,
    max_sparsity: float | None = None,
) -> Recipe:
    """Derive the recipe for ``profile`` with optional CLI overrides (pure: no I/O).

    Args:
        formats: formats to export (default: those in the profile's ``[quantization]`` table).
        quant: a scheme for every format or ``FORMAT=SCHEME,...`` (default: the profile's preference).
        seq_len: max tokens, 2..512 (default: the profile's ``budgets.latency_seq_len``, the length its
            latency budget is stated at).
        threads: runtime CPU threads (default: the profile's ``validation.threads``).
        sparsity: share of attention heads and FFN neurons to prune before export, in [0, 1) (default: the
            profile's ``[compression] sparsity``, else 0).
        max_accuracy_drop: the accuracy budget in points (default: the profile's gate, else 1.0).
        max_sparsity: the largest pruning ratio ``--search`` tries (default: the profile's
            ``[compression] max_sparsity``, 0.5).
    Raises:
        RecipeError: unknown format, a scheme the format cannot do, a format the device cannot run,
            a bad sequence length or thread count.
    """
    chosen = list(dict.fromkeys(formats)) if formats else profile.formats
    for fmt in chosen:
        if fmt not in exporters.formats():
            raise RecipeError(f"unknown format {fmt!r}; choose from {', '.join(exporters.formats())}")
    overrides = parse_quant_override(quant, chosen)
    seq = profile.budgets.latency_seq_len if seq_len is None else int(seq_len)
    if not 2 <= seq <= 512:
        raise RecipeError(f"--seq-len {seq} is out of range: use 2..512 tokens")
    sparsity = profile.compression.sparsity if sparsity is None else float(sparsity)
    if max_accuracy_drop is not None and not 0.0 <= max_accuracy_drop <= 100.0:
        raise RecipeError(f"--max-accuracy-drop {max_accuracy_drop}: use 0..100 points")
    if not 0.0 <= sparsity < 1.0:
        raise RecipeError(f"--prune {sparsity}: use a share in [0, 1), e.g. 0.3 to remove 30% of heads and FFN neurons")
    n_threads = _threads(profile, threads)
    plans = []
    for fmt in chosen:
        scheme = overrides.get(fmt) or profile.quantization.get(fmt) or "int8_dynamic"
        supported = exporters.get(fmt).schemes
        if scheme not in supported:
            why = exporters.get(fmt).unsupported.get(scheme)
            raise RecipeError(
                f"{fmt} cannot do quantization {scheme!r}"
                + (f" ({why})" if why else "")
                + f"; it supports {', '.join(supported)}"
            )
        spec = schemes.quant_spec(scheme)
        gates = gates_for(profile, scheme, max_accuracy_drop)
        plans.append(FormatPlan(format=fmt, quant=spec, delegate=_delegate(profile, fmt), gates=gates))
    max_sparsity = profile.compression.max_sparsity if max_sparsity is None else float(max_sparsity)
    if not 0.0 <= max_sparsity < 1.0:
        raise RecipeError(f"--max-sparsity {max_sparsity}: use a share in [0, 1)")
    return Recipe(
        device=profile.name,
        seq_len=seq,
        threads=n_threads,
        plans=plans,
        sparsity=sparsity,
        target_latency_ms=profile.budgets.target_latency_ms,
        max_peak_ram_mb=profile.budgets.max_peak_ram_mb,
        max_artifact_mb=profile.budgets.max_artifact_mb,
        hardware=profile.hardware.model_dump(mode="json"),
        gates_by_scheme={s: gates_for(profile, s, max_accuracy_drop) for s in schemes.names()},
        max_sparsity=max_sparsity,
        display_name=profile.display_name,
        profile=profile.to_dict(),
    )


@dataclass(frozen=True)
class GenerationRecipe:
    """What to do for a generative model on one device (from the profile's ``[llm]`` section).

    Attributes:
        device / display_name: the profile's names.
        plans: one :class:`FormatPlan` per decoder artifact (ExecuTorch, ONNX, LiteRT), with the text-generation gates
            (size within ``[llm] max_artifact_mb``).
        context_length: KV-cache positions, tokens (prompt + generated; the longest prefill).
        threads: CPU threads the runtimes use on the target.
        min_decode_tokens_per_s: the device's decode-speed goal, tokens/s (reported beside the estimate).
        ram_budget_mb: what weights + KV cache may take on the device, MB.
        smoothquant_alpha: SmoothQuant's migration strength before a LiteRT ``int8_dynamic`` export (0: none;
            :mod:`edgelm.compress.smoothquant`).
        hardware: the profile's hardware figures, for the cost model.
        profile: the profile as plain data (the manifest keeps it).
    """

    device: str
    display_name: str
    plans: list[FormatPlan]
    context_length: int
    threads: int
    min_decode_tokens_per_s: float
    ram_budget_mb: float
    smoothquant_alpha: float = 0.0
    hardware: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("profile")
        for plan, pd in zip(self.plans, d["plans"], strict=True):
            pd["artifact"] = plan.artifact_name
        return d


#: The schemes each format's decoder export takes: LiteRT also takes int8 per-channel weights.
DECODER_SCHEMES = {
    "executorch": decoder.DECODER_SCHEMES,
    "onnx": decoder.DECODER_SCHEMES,
    "tflite": decoder_tflite.SCHEMES,
}
#: Formats that export generative decoders.
DECODER_FORMATS = tuple(DECODER_SCHEMES)


def make_generation_recipe(
    profile: DeviceProfile,
    *,
    formats: list[str] | None = None,
    quant: str | None = None,
    threads: int | None = None,
    context_length: int | None = None,
) -> GenerationRecipe:
    """Derive the recipe for a generative model on ``profile`` (pure: no I/O). ``formats`` (default: the
    profile's ``[llm] formats``), ``quant`` (a scheme for every format or ``FORMAT=SCHEME``; default ``[llm]
    scheme``), ``threads`` and ``context_length`` (16..32768 tokens) override the profile.

    ``[llm] quantization`` maps a format to its own scheme (LiteRT: ``int8_dynamic``).

    Raises RecipeError: a format that cannot export decoders, a scheme the format's decoders do not take
    (:data:`DECODER_SCHEMES`), a bad count, LiteRT 8da4w with a group size its recipes do not have."""
    llm = profile.llm
    chosen = list(dict.fromkeys(formats)) if formats else list(llm.formats)
    for fmt in chosen:
        if fmt not in DECODER_FORMATS:
            raise RecipeError(f"unknown format {fmt!r} for generative models; choose from {', '.join(DECODER_FORMATS)}")
    overrides = parse_quant_override(quant, chosen)
    ctx = llm.context_length if context_length is None else int(context_length)
    if not 16 <= ctx <= 32768:
        raise RecipeError(f"--context-length {ctx}: use 16..32768 tokens")
    n_threads = _threads(profile, threads)
    plans = []
    for fmt in chosen:
        scheme = overrides.get(fmt) or llm.quantization.get(fmt) or llm.scheme
        if scheme not in DECODER_SCHEMES[fmt]:
            raise RecipeError(f"generative {fmt} models export as {' or '.join(DECODER_SCHEMES[fmt])}, not {scheme!r}")
        if fmt == "tflite" and scheme == "8da4w" and llm.group_size not in decoder_tflite.GROUP_SIZES:
            raise RecipeError(
                f"LiteRT's int4 recipes use blocks of {' or '.join(map(str, decoder_tflite.GROUP_SIZES))}, and the profile's "
                f"[llm] group_size is {llm.group_size}: change it, or leave tflite out of --format"
            )
        gates = dataclasses.replace(gates_for(profile, scheme), max_size_mb=llm.max_artifact_mb)
        spec = QuantSpec(scheme=scheme, embedding_bits=8 if scheme == "8da4w" else None, group_size=llm.group_size)
        plans.append(FormatPlan(format=fmt, quant=spec, delegate=_delegate(profile, fmt), gates=gates))
    return GenerationRecipe(
        device=profile.name,
        display_name=profile.display_name,
        plans=plans,
        context_length=ctx,
        threads=n_threads,
        min_decode_tokens_per_s=llm.min_decode_tokens_per_s,
        ram_budget_mb=llm.ram_budget_mb,
        smoothquant_alpha=llm.smoothquant_alpha,
        hardware=profile.hardware.model_dump(mode="json"),
        profile=profile.to_dict(),
    )
