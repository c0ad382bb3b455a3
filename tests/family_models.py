"""Tiny random-weight bases of each model family the engine and the exports support.

Built in code from each family's transformers config class (2 layers, hidden 64, SmolLM2's
tokenizer and chat template), so tests need no download. Each family sets the features that
make it differ from plain Llama: Llama 3 rope scaling, Qwen2 q/k/v bias, Qwen3 q/k norm,
Mistral sliding window, Gemma 2 soft-capping and alternating local/global attention,
Gemma 3 q/k norm, scaled embeddings and local/global rope.

    from tests.family_models import FAMILIES, build_family
    folder = build_family("qwen2", tmp_path / "qwen2", smol_tokenizer_dir)
"""
from __future__ import annotations

import shutil
from pathlib import Path

VOCAB = 49152  # SmolLM2's tokenizer
# initializer_range: big enough that greedy tokens vary (a tied 0.02 init repeats one token);
# Gemma scales embeddings by sqrt(hidden) and keeps its default
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _llama3():
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return LlamaForCausalLM, LlamaConfig(**COMMON, initializer_range=0.2, tie_word_embeddings=True, rope_parameters=rope)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(**COMMON, initializer_range=0.2, tie_word_embeddings=True)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM, Qwen3Config(**COMMON, initializer_range=0.2, head_dim=16, tie_word_embeddings=True)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(**COMMON, initializer_range=0.2, sliding_window=8, tie_word_embeddings=False)


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM, Gemma2Config(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                           hidden_activation="gelu_pytorch_tanh")


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM, Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                               layer_types=["sliding_attention", "full_attention"])


FAMILIES = {"llama3": _llama3, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "gemma2": _gemma2,
            "gemma3": _gemma3}


def save_random_model(cls, config, out: Path, tokenizer_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Instantiate ``cls(config)`` with seed ``seed``, perturb its norms (random init is tiny on some
    families: Gemma norms start at 0; this makes every layer matter), save it in ``out`` with the
    tokenizer files of ``tokenizer_dir`` (if given); return ``out``."""
    import torch

    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, out / f.name)
    return out


def build_family(family: str, out: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """Save a tiny random ``family`` base (weights, config, SmolLM2 tokenizer) in ``out``; return ``out``."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    cls, config = FAMILIES[family]()
    return save_random_model(cls, config, out, tokenizer_dir, seed=seed)


# -- SentencePiece-style tokenizers (Mistral v0.x / Llama 2, Gemma) ----------------------------
#
# Real Mistral v0.x, Llama 2 and Gemma ship a SentencePiece BPE model; their tokenizer.json is the
# transformers conversion of it: a BPE with byte_fallback, the 256 <0xNN> byte tokens, spaces as
# "▁", and *every* split of each piece listed as a merge, ordered by the piece's score (so the
# merges reproduce SentencePiece's score-driven merging). build_spm_tokenizer makes the same kind
# of file from a small BPE trained on evals/data/general.jsonl, with no download.

SPM_STYLES = {
    # Llama 2 / Mistral v0.1 (legacy): "▁" put before every stretch of text, special tokens included
    "llama": {"specials": ["<unk>", "<s>", "</s>"], "bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None,
              "class": "LlamaTokenizer", "legacy": True,
              "template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                          " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"},
    # Mistral v0.3 style (legacy=False): Metaspace puts "▁" only before the start of the text
    "metaspace": {"specials": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "bos": "<s>", "eos": "</s>",
                  "unk": "<unk>", "pad": None, "class": "LlamaTokenizer", "legacy": False,
                  "template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                              "{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
                              "{% endfor %}"},
    # Gemma 1/2/3: spaces replaced by "▁" in the normalizer, no "▁" added in front, turn markers special
    "gemma": {"specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"], "bos": "<bos>",
              "eos": "<eos>", "unk": "<unk>", "pad": "<pad>", "class": "GemmaTokenizer",
              "template": "{{ bos_token }}{% for m in messages %}<start_of_turn>"
                          "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
                          "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"},
}


def build_spm_tokenizer(out: Path, style: str = "llama", *, pieces: int = 700) -> Path:
    """Save a SentencePiece-style tokenizer.json + tokenizer_config.json (``style`` in SPM_STYLES) in ``out``."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    spec = SPM_STYLES[style]
    root = Path(__file__).resolve().parents[1]
    lines = [json.loads(line)["text"] for line in (root / "evals" / "data" / "general.jsonl").read_text().splitlines()
             if line.strip()]
    trainer_tok = Tokenizer(models.BPE(unk_token=spec["unk"]))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=pieces, min_frequency=2, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]["vocab"]   # id order = merge order = SentencePiece score order

    vocab = {tok: i for i, tok in enumerate(spec["specials"])}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    order = sorted(trained, key=trained.get)
    for piece in order:
        vocab.setdefault(piece, len(vocab))
    # every split of a piece into two pieces, ranked by (piece, left, right): transformers' SentencePiece conversion
    merges = sorted(((vocab[p], vocab[p[:i]], vocab[p[i:]]), (p[:i], p[i:]))
                    for p in order for i in range(1, len(p)) if p[:i] in trained and p[i:] in trained)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m for _, m in merges], unk_token=spec["unk"], fuse_unk=True,
                               byte_fallback=True))
    if style == "llama":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]])
    bos = spec["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": spec["class"], "bos_token": spec["bos"], "eos_token": spec["eos"], "unk_token": spec["unk"],
           "pad_token": spec["pad"] or spec["eos"], "add_bos_token": True, "add_eos_token": False,
           "model_max_length": 2048, "chat_template": spec["template"]}
    if "legacy" in spec:
        cfg.update(legacy=spec["legacy"], add_prefix_space=True)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def build_family_spm(family: str, out: Path, style: str, *, seed: int = 0) -> Path:
    """A tiny random ``family`` base with a SentencePiece-style tokenizer (``build_spm_tokenizer``) sized to it."""
    import json

    from transformers import AutoTokenizer

    out = Path(out)
    build_spm_tokenizer(out, style)
    n_vocab = len(AutoTokenizer.from_pretrained(out))
    ids = {k: json.loads((out / "tokenizer.json").read_text())["model"]["vocab"][SPM_STYLES[style][k]]
           for k in ("bos", "eos")}
    cls, config = FAMILIES[family]()
    config.vocab_size = n_vocab
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["bos"], ids["eos"], ids["eos"]
    return save_random_model(cls, config, out, seed=seed)
