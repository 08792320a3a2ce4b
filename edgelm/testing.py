"""Tiny random-config checkpoints (BERT or RoBERTa, embedding model or classifier) with a real WordPiece
tokenizer over the probe sentences' words: what edgelm's tests, and examples/android/jvm-test.sh, export in
seconds instead of a real model. Needs torch and transformers (the SDK side)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab() -> list[str]:
    from edgelm.data import PROBE_SENTENCES

    words = sorted({w for s in PROBE_SENTENCES for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    pieces = [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return SPECIALS + list("abcdefghijklmnopqrstuvwxyz0123456789") + pieces + words


def make_checkpoint(
    directory: Path,
    *,
    kind: str = "embedding",
    model_type: str = "bert",
    num_labels: int = 2,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a tiny random checkpoint to ``directory``: config.json, model.safetensors (``hidden`` wide,
    ``layers`` deep, ``heads`` heads; ``kind`` "embedding" or "classifier" with ``num_labels`` classes named
    negative/positive/neutral), tokenizer.json, vocab.txt (~800 WordPiece tokens) and tokenizer_config.json.
    Returns ``directory``."""
    import torch
    import transformers
    from tokenizers.implementations import BertWordPieceTokenizer

    torch.manual_seed(seed)
    vocab = _vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    common = dict(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=130 if model_type == "roberta" else 128,
    )
    if model_type == "bert":
        config = transformers.BertConfig(**common)
        cls = transformers.BertForSequenceClassification if kind == "classifier" else transformers.BertModel
    else:
        config = transformers.RobertaConfig(**common, pad_token_id=0)
        cls = transformers.RobertaForSequenceClassification if kind == "classifier" else transformers.RobertaModel
    if kind == "classifier":
        config.num_labels = num_labels
        config.id2label = {i: ["negative", "positive", "neutral"][i] for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    model = cls(config).eval()
    model.save_pretrained(directory)
    tok = BertWordPieceTokenizer(str(directory / "vocab.txt"), lowercase=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "pad_token": "[PAD]"}))
    return directory


#: The chat template of the tiny causal LMs (ChatML, as SmolLM2's).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_causal_lm(
    directory: Path,
    *,
    family: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 384,
    seed: int = 0,
    init_std: float | None = None,
) -> Path:
    """A tiny random-config causal LM (``family``: llama, qwen2, qwen3 or mistral; 4 query heads, 2 KV
    heads) with a byte-level BPE tokenizer trained on the probe sentences and the golden prompts, a ChatML
    chat template, BOS ``<|im_start|>`` (1) and EOS ``<|im_end|>`` (2). ``init_std``: draw the weight
    matrices from N(0, init_std) instead of transformers' init (0.3: logits with a clear arg-max, for exact
    token comparisons; such a model is too chaotic for 4-bit weights). Returns ``directory``."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgelm.data import PROBE_SENTENCES
    from edgelm.generation import PROMPTS

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([*PROBE_SENTENCES, *PROMPTS], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    kwargs = {"head_dim": hidden // 4} if family == "qwen3" else {}
    cfg = config_cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kwargs,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, init_std)
    model.save_pretrained(directory)
    return directory


def write_gguf(checkpoint: Path, path: Path, *, linear_type: str = "Q4_1") -> Path:
    """Write the tiny Llama checkpoint of :func:`make_causal_lm` as a llama.cpp GGUF file at ``path``, as
    llama.cpp's ``convert_hf_to_gguf.py`` lays it out: linears in ``linear_type`` (``Q4_0``, ``Q4_1``), the
    tied embedding ``Q8_0``, norms float32, q/k rows permuted for llama.cpp's RoPE, and the BPE tokenizer
    (``gpt2`` model, tokens, merges, BOS/EOS, chat template) in the metadata. transformers loads it with
    ``from_pretrained(dir, gguf_file=...)``. Returns ``path``."""
    import gguf
    import torch
    import transformers

    from edgelm.gguf_weights import GGUF_TO_HF
    from edgelm.models import name_map

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    cfg = model.config
    tok = json.loads((Path(checkpoint) / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(
        float(cfg.rope_parameters.get("rope_theta", 10000.0)) if getattr(cfg, "rope_parameters", None) else 10000.0
    )
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{linear_type}"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_chat_template(CHATML)

    def permute(t: np.ndarray, heads: int) -> np.ndarray:  # convert_hf_to_gguf.py LlamaModel.permute
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    gguf_name = name_map({hf: g for g, hf in GGUF_TO_HF.items()})
    for key, value in model.state_dict().items():
        name = gguf_name(key)
        if name is None or (name == "output.weight" and cfg.tie_word_embeddings):
            continue  # a tied head is the embedding
        data = value.detach().float().numpy()
        if name.endswith("attn_q.weight"):
            data = permute(data, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = permute(data, cfg.num_key_value_heads)
        if data.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(data))
            continue
        qtype = gguf.GGMLQuantizationType["Q8_0" if name == "token_embd.weight" else linear_type]
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
