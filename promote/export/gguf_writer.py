"""Hugging Face model folder -> GGUF file that llama.cpp runs, written with the ``gguf`` package.

No code from llama.cpp's converter is used; the route is:

    config.json        -> <arch>.* hyperparameters (per family: ``gguf_arch.py``)
    *.safetensors      -> tensors renamed with gguf's name map
                          (model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight),
                          q/k rows permuted (llama arch only), Gemma norms + 1,
                          1-D norms kept f32, 2-D weights f16 or q8_0
    tokenizer.json     -> tokenizer.ggml.*: byte-level BPE as "gpt2" (tokens, types, merges,
                          pre-tokenizer name); SentencePiece-style BPE (byte_fallback, "▁")
                          as "llama" (tokens, scores, types incl. BYTE <0xNN>, space prefix);
                          special ids, add_bos/add_eos
    chat template      -> tokenizer.chat_template

Why q and k are permuted: transformers applies rotary embeddings to the two
*halves* of each head (x[i] with x[i + d/2]); GGML's default (NORM) rope rotates
*adjacent* pairs (x[2i] with x[2i+1]). Reordering the output rows of q_proj and
k_proj per head makes the two agree::

    head rows  [a0 a1 a2 a3 | b0 b1 b2 b3]   (HF: halves)
           ->  [a0 b0 a1 b1 a2 b2 a3 b3]     (GGML: interleaved pairs)

The same reordering applies to anything that adds to those rows, e.g. a LoRA's
``lora_B`` of q_proj/k_proj (see ``gguf_lora.py``).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from loradex.hub.errors import InvalidConfig
from loradex.promote.export.gguf_arch import add_family_keys, context_length, family_of, hparams

QUANTS = ("f32", "f16", "q8_0")
METHOD = "loradex gguf_writer (gguf package; own tensor map, q/k permutation, tokenizer metadata)"

# The pre-tokenizer llama.cpp must use, keyed by a hash of how the HF tokenizer
# splits PRE_PROBE. llama.cpp identifies tokenizers the same way (by behaviour);
# a wrong choice silently tokenizes digits or spaces differently from transformers.
PRE_PROBE = "Hello world! 3.14159 and 1234567 apples;  tabs\tand\nnewlines, I'm you'll ÄÖÜ ñ 中文 🙂 <b>x</b>"
KNOWN_PRE = {
    # SmolLM / SmolLM2 (135M/360M/1.7B): digits split one by one
    "9919d6668685e135ca6301919a39db23f213c3e6362cd775d6354e94ef03d06d": "smollm",
}


# Tokenizers whose behaviour hash is unknown here (their files are not on these machines) are
# recognised by the split regex of their pre-tokenizer, which is what llama.cpp's named
# pre-tokenizer implements: Llama 3 splits digits in runs of up to 3, Qwen2/2.5/3 one by one.
KNOWN_PRE_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def split_regex(tok_json: dict) -> str | None:
    """The regex of the pre-tokenizer's Split step (alone or first in a Sequence), if any."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split" and isinstance(step.get("pattern"), dict):
            return step["pattern"].get("Regex")
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder rows of a q/k projection (or its lora_B) from HF halves to GGML pairs."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise InvalidConfig(f"cannot permute a q/k tensor with {rows} rows over {n_head} heads")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- config ---------------------------------------------------------------------------

def read_config(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    family_of(cfg)  # refuses an unsupported architecture, naming the supported ones
    return cfg


# -- tensors --------------------------------------------------------------------------

def iter_tensors(folder: Path):
    """(name, float32 numpy array) for every tensor in the folder's safetensors files."""
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidConfig(f"{folder} has no .safetensors files to convert")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                yield key, st.get_tensor(key).to(torch.float32).numpy()


def tensor_type(name: str, arr: np.ndarray, quant: str):
    import gguf

    T = gguf.GGMLQuantizationType
    if arr.ndim < 2 or quant == "f32":
        return T.F32
    if quant == "q8_0" and arr.shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16


def encode(arr: np.ndarray, qtype) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return arr.astype(np.float32)
    if qtype == T.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr.astype(np.float32), qtype)


# -- tokenizer ------------------------------------------------------------------------

def tokenizer_files(folder: Path) -> tuple[dict, dict]:
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise InvalidConfig(f"{folder} has no tokenizer.json; --format gguf needs a fast (BPE) tokenizer")
    tcfg = folder / "tokenizer_config.json"
    return json.loads(tj.read_text()), (json.loads(tcfg.read_text()) if tcfg.is_file() else {})


def chat_template(folder: Path, tok_cfg: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tmpl = tok_cfg.get("chat_template")
    return tmpl if isinstance(tmpl, str) else None


def pre_tokenizer_name(folder: Path, tok_json: dict, override: str | None = None) -> str:
    """The llama.cpp pre-tokenizer name for this tokenizer (``override`` wins)."""
    if override:
        return override
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tok.encode(PRE_PROBE, add_special_tokens=False).ids
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest]
    if split_regex(tok_json) in KNOWN_PRE_REGEX:
        return KNOWN_PRE_REGEX[split_regex(tok_json)]
    pre = tok_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise InvalidConfig(
        f"unknown pre-tokenizer (behaviour hash {digest[:16]}); llama.cpp would tokenize differently from "
        f"transformers. Pass the llama.cpp pre-tokenizer name explicitly with --gguf-pre NAME"
    )


def token_id(tok_json: dict, content) -> int | None:
    if isinstance(content, dict):
        content = content.get("content")
    if content is None:
        return None
    for t in tok_json.get("added_tokens", []):
        if t["content"] == content:
            return t["id"]
    return tok_json["model"]["vocab"].get(content)


def adds_special(folder: Path, tok_cfg: dict, key: str, token: int | None, position: int) -> bool:
    """Whether the HF tokenizer adds ``token`` at ``position`` (0 = start, -1 = end) of a plain encode."""
    explicit = tok_cfg.get(key)
    if isinstance(explicit, bool):
        return explicit
    if token is None:
        return False
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[position] == token


def is_sentencepiece(tok_json: dict) -> bool:
    """A SentencePiece-style BPE (byte_fallback, "▁" for spaces), as Gemma, Mistral v0.x and Llama 2 ship."""
    model = tok_json.get("model", {})
    pipeline = json.dumps([tok_json.get("normalizer"), tok_json.get("pre_tokenizer")])
    return bool(model.get("byte_fallback")) or "Metaspace" in pipeline


def _steps(part: dict | None) -> list[dict]:
    """The steps of a normalizer / pre-tokenizer, alone or in a Sequence."""
    if not part:
        return []
    if part.get("type") != "Sequence":
        return [part]
    return [s for s in part.get("normalizers") or part.get("pretokenizers") or [] if s]


def space_prefix(folder: Path) -> tuple[bool, str]:
    """(whether transformers puts "▁" before the text, how: "always" / "first" / "never").

    Read from the tokenizer transformers actually builds: transformers 5's Llama/Gemma tokenizer
    classes replace tokenizer.json's pipeline with their own (``legacy`` picks Metaspace's
    prepend_scheme), so the file alone can say something else.
    """
    from loradex.hub.loading import load_tokenizer

    backend = json.loads(load_tokenizer(folder).backend_tokenizer.to_str())
    for step in _steps(backend.get("normalizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True, "always"   # applied to every piece of text between special tokens
    for step in _steps(backend.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            return scheme != "never", scheme
    return False, "never"


def vocab_by_id(tok_json: dict, n_vocab: int) -> tuple[dict[int, str], dict[int, dict]]:
    vocab: dict[str, int] = dict(tok_json["model"]["vocab"])
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    for tid, t in added.items():
        vocab[t["content"]] = tid
    by_id = {i: tok for tok, i in vocab.items()}
    if max(by_id) >= n_vocab:
        raise InvalidConfig(f"tokenizer has token id {max(by_id)} but the model's vocab_size is {n_vocab}")
    return by_id, added


def merge_scores(tok_json: dict) -> dict[str, float]:
    """SentencePiece piece scores recovered from the merges: a piece first made by merge r scores -r.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest;
    transformers' BPE merges the pair ranked first. A tokenizer.json converted from SentencePiece
    lists every split of a piece, ranked by the piece's score, so both pick the same pair.
    """
    scores: dict[str, float] = {}
    for rank, m in enumerate(tok_json["model"].get("merges", [])):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        scores.setdefault(left + right, -float(rank))
    return scores


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def add_gpt2_vocab(writer, folder: Path, tok_json: dict, n_vocab: int, pre: str | None) -> dict:
    """Byte-level BPE (Llama 3, Qwen2/3, SmolLM): tokens, types, merges and llama.cpp's pre-tokenizer name."""
    import gguf

    by_id, added = vocab_by_id(tok_json, n_vocab)
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            # special added tokens must be CONTROL, or llama.cpp prints/splits them as text
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    pre_name = pre_tokenizer_name(folder, tok_json, pre)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    return {"model": "gpt2", "pre": pre_name, "n_tokens": len(tokens), "n_merges": len(merges),
            "control_tokens": sum(1 for t in types if t == T.CONTROL)}


def add_spm_vocab(writer, folder: Path, tok_json: dict, n_vocab: int, pre: str | None, unk: int | None) -> dict:
    """SentencePiece-style BPE (Gemma, Mistral v0.x, Llama 2) as llama.cpp's "llama" vocabulary.

    Tokens keep "▁" for spaces; types mark the 256 <0xNN> byte-fallback tokens BYTE, <unk>
    UNKNOWN, special added tokens CONTROL; scores come from the merge ranks (``merge_scores``);
    ``add_space_prefix`` says whether a "▁" goes before the text (Llama 2/Mistral yes, Gemma no).
    """
    import gguf

    if pre and pre != "default":
        raise InvalidConfig(f"--gguf-pre {pre!r}: a SentencePiece-style tokenizer has no pre-tokenizer in "
                            f"llama.cpp (it is always 'default')")
    by_id, added = vocab_by_id(tok_json, n_vocab)
    scores_by_piece = merge_scores(tok_json)
    n_merges = len(tok_json["model"].get("merges", []))
    tokens, scores, types = [], [], []
    T = gguf.TokenType
    for i in range(n_vocab):
        tok = by_id.get(i)
        score = 0.0
        if tok is None:
            tok, kind = f"[PAD{i}]", T.UNUSED
        elif i in added and added[i].get("special") and i != unk:
            kind = T.CONTROL
        elif i == unk:
            kind = T.UNKNOWN
        elif i in added:
            kind = T.USER_DEFINED
        elif BYTE_TOKEN.fullmatch(tok):
            kind = T.BYTE
        else:
            kind = T.NORMAL
            # pieces no merge makes (single characters) rank below every merged piece, in id order
            score = scores_by_piece.get(tok, -float(n_merges + i))
        tokens.append(tok)
        scores.append(score)
        types.append(kind)
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in tok_json["model"]["vocab"]]
    if missing:
        raise InvalidConfig(f"--format gguf: this byte_fallback tokenizer lacks byte tokens ({', '.join(missing[:3])}"
                            f"...); llama.cpp would drop the characters it cannot spell")
    prefix, scheme = space_prefix(folder)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prefix)
    notes = []
    if scheme == "first":
        # measured (tests/test_llamacpp_families.py): llama.cpp puts "▁" before every stretch of text
        # that follows a special token and before text that starts with a space; transformers
        # (Metaspace prepend_scheme "first", legacy=False) does neither
        notes.append("llama.cpp adds a space prefix to text that follows a special token or starts with a space, "
                     "transformers (legacy=false tokenizer) does not: such prompts tokenize differently in "
                     "llama.cpp (\"<s>[INST] hi\" becomes <s> ▁ [INST] ...)")
    return {"model": "llama", "pre": "default", "n_tokens": len(tokens), "add_space_prefix": prefix,
            "space_prefix_scheme": scheme, "byte_tokens": sum(1 for t in types if t == T.BYTE),
            "control_tokens": sum(1 for t in types if t == T.CONTROL), "notes": notes}


def add_tokenizer(writer, folder: Path, n_vocab: int, pre: str | None) -> dict:
    tok_json, tok_cfg = tokenizer_files(folder)
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise InvalidConfig(f"--format gguf supports BPE tokenizers (byte-level or SentencePiece-style); "
                            f"this one is {model.get('type')!r}")
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        tid = token_id(tok_json, tok_cfg.get(key))
        if tid is not None:
            special[key] = tid
    if is_sentencepiece(tok_json):
        info = add_spm_vocab(writer, folder, tok_json, n_vocab, pre, special.get("unk_token"))
    else:
        info = add_gpt2_vocab(writer, folder, tok_json, n_vocab, pre)
    for key, fn in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                    ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        if key in special:
            fn(special[key])
    add_bos = adds_special(folder, tok_cfg, "add_bos_token", special.get("bos_token"), 0)
    add_eos = adds_special(folder, tok_cfg, "add_eos_token", special.get("eos_token"), -1)
    # written explicitly: llama.cpp's default differs between vocabulary types and versions
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    tmpl = chat_template(folder, tok_cfg)
    if tmpl:
        writer.add_chat_template(tmpl)
    return {**info, "add_bos_token": add_bos, "add_eos_token": add_eos, "special": special,
            "chat_template": bool(tmpl)}


# -- the writer -----------------------------------------------------------------------

def write_model_gguf(folder: str | Path, out_path: str | Path, *, quant: str = "f16", name: str | None = None,
                     pre: str | None = None) -> dict:
    """Write the HF model in ``folder`` (a supported family) as a GGUF file; returns what was written."""
    import gguf

    if quant not in QUANTS:
        raise InvalidConfig(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    folder, out_path = Path(folder), Path(out_path)
    cfg = read_config(folder)
    fam = family_of(cfg)
    hp = hparams(cfg)
    arch = getattr(gguf.MODEL_ARCH, fam.arch)
    name_map = gguf.get_tensor_name_map(arch, hp["n_layer"])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]

    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or folder.name)
    extra, notes = add_family_keys(writer, fam, cfg, hp)
    writer.add_context_length(context_length(fam, cfg, hp))
    writer.add_embedding_length(hp["n_embd"])
    writer.add_block_count(hp["n_layer"])
    writer.add_feed_forward_length(hp["n_ff"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_vocab_size(hp["vocab"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_info = add_tokenizer(writer, folder, hp["vocab"], pre)
    notes = notes + tok_info.pop("notes", [])

    written: dict[str, dict] = {}
    skipped = []
    for new, arr in extra:
        writer.add_tensor(new, arr, raw_dtype=gguf.GGMLQuantizationType.F32)
        written[new] = {"shape": list(arr.shape), "type": "F32", "from": "config.json rope_parameters"}
    for key, arr in iter_tensors(folder):
        if key.endswith("rotary_emb.inv_freq"):
            skipped.append(key)
            continue
        if key == "lm_head.weight" and hp["tied"]:
            # tied embeddings: llama.cpp reuses token_embd when output.weight is absent
            skipped.append(key)
            continue
        new = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise InvalidConfig(f"--format gguf: no GGUF name for tensor {key!r} of a {fam.family} model")
        if fam.permute_qk and key.endswith("self_attn.q_proj.weight"):
            arr = permute_qk(arr, hp["n_head"])
        elif fam.permute_qk and key.endswith("self_attn.k_proj.weight"):
            arr = permute_qk(arr, hp["n_head_kv"])
        if fam.norm_offset and key.endswith("norm.weight"):
            arr = arr + fam.norm_offset
        qtype = tensor_type(new, arr, quant)
        writer.add_tensor(new, encode(arr, qtype), raw_dtype=qtype)
        written[new] = {"shape": list(arr.shape), "type": qtype.name, "from": key}

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"method": METHOD, "quant": quant, "tensors": len(written), "skipped": skipped,
            "tied_embeddings": hp["tied"], "tokenizer": tok_info, "architecture": gguf.MODEL_ARCH_NAMES[arch],
            "family": fam.family, "notes": notes, "size_bytes": out_path.stat().st_size}
