"""The scheme table: everything a quantization scheme implies, in one place, keyed by the scheme's name.

Every module that needs to know what a scheme means asks this table: the recipe (the QuantSpec and the
default gates), the accuracy-budget search (its ladder), the cost model (bits per weight, int8 kernels),
validation and the Android bundle (the golden tolerance), and the pipeline (whether swappable adapters can
share one base). Adding a scheme is adding one row here (and teaching the format modules in ``exporters/``
to produce it).

The exporter layer (``exporters/``, which never imports edgelm) knows the scheme names only
(:data:`exporters.base.SCHEMES`); a test checks that both list the same names.

Ground floor: imports nothing above it and no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelm.errors import RecipeError
from exporters.base import QuantSpec


@dataclass(frozen=True)
class Scheme:
    """What one quantization scheme implies.

    Attributes:
        name: the scheme's name (``"int8_dynamic"``), as in :data:`exporters.base.SCHEMES`.
        summary: one line for tables and ``--help``.
        weight_bits: bits per Linear weight (32, 16, 8 or 4); scales are counted apart by the cost model.
        int8_compute: whether the Linear layers run on int8 kernels (the cost model's int8 rate).
        embedding_bits: the word-embedding table's bits by default (8: quantized per row; None: float).
        float_layers: layer groups (:data:`exporters.base.LAYER_GROUPS`) kept float by default.
        min_cosine: default gate (embeddings), mean cosine similarity to the PyTorch fp32 reference, [-1, 1].
        min_top1_agreement: default gate (classifiers), share of inputs whose arg-max equals the reference's,
            [0, 1].
        golden_max_rel_error: golden tolerance: the largest |artifact - PyTorch fp32| allowed, as a share of
            the reference's scale (its largest |value| for embeddings, the logits' range for classifiers:
            :attr:`edgelm.tasks.Task.error_scale`).
        search_float_layers: the variants the accuracy-budget search tries (one tuple of float layer
            groups each); empty: the search never tries this scheme.
        search_order: the search's order, most aggressive first (lower tries first); None: not searched.
        needs_calibration: activation scales fixed from representative inputs (``--data``).
        adapters_share_base: swappable LoRA adapters can share one base artifact (calibrated activation
            scales depend on the adapter, so static schemes cannot).
        max_perplexity_ratio: default gate (text-generation), the artifact's perplexity over the reference's.
        min_token_agreement: default gate (text-generation), share of golden prompts whose greedy tokens equal
            the reference's, [0, 1].
    """

    name: str
    summary: str
    weight_bits: int
    int8_compute: bool
    embedding_bits: int | None
    float_layers: tuple[str, ...]
    min_cosine: float
    min_top1_agreement: float
    golden_max_rel_error: float
    search_float_layers: tuple[tuple[str, ...], ...] = ()
    search_order: int | None = None
    needs_calibration: bool = False
    adapters_share_base: bool = True
    max_perplexity_ratio: float = 1.05
    min_token_agreement: float = 0.5

    def quant_spec(self, float_layers: tuple[str, ...] | None = None, group_size: int = 32) -> QuantSpec:
        """The :class:`~exporters.QuantSpec` edgelm exports this scheme with: per-channel int8 scales, the
        default embedding bits, int4 groups of ``group_size`` and ``float_layers`` (default: this scheme's)."""
        return QuantSpec(
            scheme=self.name,
            per_channel=True,
            embedding_bits=self.embedding_bits,
            group_size=group_size,
            float_layers=tuple(self.float_layers if float_layers is None else float_layers),
        )


#: The table. Gates and tolerances: fp32 artifacts match PyTorch to kernel rounding; fp16 keeps ~3
#: significant digits; int8 dynamic per-channel keeps MiniLM at cosine ~0.993-0.998; static int8 (sensitive
#: layers float) and 4-bit weights cost more fidelity, so with labels the accuracy-drop gate decides.
#: Static int8 over every op collapses transformers (MiniLM cosine 0.38): the FFN down-projections stay float.
#: Generative models: fp32 decoders match the reference to rounding (greedy tokens can still part at a near
#: tie); 8da4w re-quantizes every linear to 4 bits, which moves perplexity a few percent and parts the greedy
#: continuation of some prompts after a few tokens (see the README's generation results).
#: The head (classifier, pooler) stays float too, so a classifier's logits are never quantized: quantized to
#: 256 levels (step 0.021 on an SST-2 fine-tune) two-class logits tie exactly and argmax falls to class 0.
TABLE: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "fp32",
            "float32, no quantization",
            weight_bits=32,
            int8_compute=False,
            embedding_bits=None,
            float_layers=(),
            min_cosine=0.9999,
            min_top1_agreement=0.99,
            golden_max_rel_error=1e-3,
            search_float_layers=((),),
            search_order=5,
            max_perplexity_ratio=1.001,
            min_token_agreement=0.9,
        ),
        Scheme(
            "fp16",
            "float16 weights (GPU delegates; on CPU it halves size, not time)",
            weight_bits=16,
            int8_compute=False,
            embedding_bits=None,
            float_layers=(),
            min_cosine=0.999,
            min_top1_agreement=0.99,
            golden_max_rel_error=1e-2,
            search_float_layers=((),),
            search_order=4,
        ),
        Scheme(
            "int8_dynamic",
            "int8 weights per channel, activations quantized at run time",
            weight_bits=8,
            int8_compute=True,
            embedding_bits=8,
            float_layers=(),
            min_cosine=0.99,
            min_top1_agreement=0.95,
            golden_max_rel_error=0.25,
            search_float_layers=((),),
            search_order=3,
            # LiteRT decoders (int8 per-channel weights, --format tflite): the 8da4w gates
            max_perplexity_ratio=1.10,
            min_token_agreement=0.15,
        ),
        Scheme(
            "int8_static",
            "int8 weights and calibrated int8 activations (PTQ), FFN down-projections and head float",
            weight_bits=8,
            int8_compute=True,
            embedding_bits=8,
            float_layers=("ffn_output", "head"),
            min_cosine=0.95,
            min_top1_agreement=0.90,
            golden_max_rel_error=0.5,
            search_float_layers=(("ffn_output", "head"), ("ffn_output", "attention_output", "head")),
            search_order=2,
            needs_calibration=True,
            adapters_share_base=False,
        ),
        Scheme(
            "8da4w",
            "int8 dynamic activations, int4 group-wise weights",
            weight_bits=4,
            int8_compute=True,
            embedding_bits=8,
            float_layers=(),
            min_cosine=0.90,
            min_top1_agreement=0.85,
            golden_max_rel_error=0.5,
            search_float_layers=((),),
            search_order=1,
            max_perplexity_ratio=1.10,
            # SmolLM2-135M with its GGUF's own weights and int8 activations: perplexity 1.02x, yet 22% (.pte,
            # per-token activation scales) to 41% (ONNX, per-block) of prompts keep all 32 greedy tokens; one
            # flipped near-tie changes the rest. A broken decoder (RoPE, cache) agrees on none.
            min_token_agreement=0.15,
        ),
        Scheme(
            "int4_weight_only",
            "int4 group-wise weights, float activations",
            weight_bits=4,
            int8_compute=False,
            embedding_bits=8,
            float_layers=(),
            min_cosine=0.90,
            min_top1_agreement=0.85,
            golden_max_rel_error=0.5,
        ),
    )
}


def names() -> list[str]:
    """The scheme names, in the table's order."""
    return list(TABLE)


def get(name: str) -> Scheme:
    """The :class:`Scheme` called ``name``. Raises RecipeError (exit 2) naming the known schemes."""
    try:
        return TABLE[name]
    except KeyError:
        raise RecipeError(f"unknown quantization scheme {name!r}; choose from {', '.join(TABLE)}") from None


def quant_spec(name: str, float_layers: tuple[str, ...] | None = None) -> QuantSpec:
    """Shortcut for ``get(name).quant_spec(float_layers)``. Raises RecipeError for an unknown scheme."""
    return get(name).quant_spec(float_layers)


def search_ladder() -> list[tuple[str, tuple[str, ...]]]:
    """``(scheme, float layer groups)`` the accuracy-budget search tries, most aggressive first: less sparsity,
    more layers in float, 8-bit instead of 4-bit come later."""
    searched = sorted((s for s in TABLE.values() if s.search_order is not None), key=lambda s: s.search_order)
    return [(s.name, fl) for s in searched for fl in s.search_float_layers]


def golden_max_abs_error(scheme: str, reference: np.ndarray, relative_to: str = "max_abs") -> float:
    """The largest |artifact - PyTorch fp32| a ``scheme`` artifact may show on ``reference`` (float [N, D]):
    the scheme's :attr:`Scheme.golden_max_rel_error` times the reference's scale, ``relative_to``
    ``"max_abs"`` (its largest |value|: embeddings) or ``"range"`` (max - min: a classifier's logits).
    Raises RecipeError for an unknown scheme or scale."""
    ref = np.asarray(reference, dtype=np.float64)
    if relative_to == "max_abs":
        scale = float(np.abs(ref).max())
    elif relative_to == "range":
        scale = float(ref.max() - ref.min())
    else:
        raise RecipeError(f"unknown error scale {relative_to!r} (max_abs or range)")
    return get(scheme).golden_max_rel_error * scale
