"""SentencePiece-style tokenizers (Gemma, Mistral v0.x / Llama 2) written into GGUF, read back with ``gguf``.

The tokenizers are built in code (tests/family_models.py ``build_spm_tokenizer``: a byte_fallback BPE
trained on evals/data/general.jsonl, the 256 <0xNN> tokens, "▁" for spaces) and attached to tiny
Mistral, Gemma 2 and Gemma 3 bases. Checked: llama.cpp's "llama" vocabulary (tokens by id, scores from the
merge ranks, BYTE / UNKNOWN / CONTROL / NORMAL types), the space prefix per style, special ids, and
the Mistral sliding-window context length. Running the files in llama.cpp against transformers is
tests/test_llamacpp_families.py (marker ``llamacpp``).
"""
from __future__ import annotations

import json

import pytest

from loradex.hub.errors import InvalidConfig
from loradex.promote.export.gguf_writer import write_model_gguf
from loradex.promote.export.ollama import modelfile
from tests.family_models import build_family_spm


def _read(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def spm_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm-bases")
    return {"mistral": build_family_spm("mistral", root / "mistral", "llama"),
            "gemma2": build_family_spm("gemma2", root / "gemma2", "gemma"),
            "gemma3": build_family_spm("gemma3", root / "gemma3", "gemma"),
            "metaspace": build_family_spm("mistral", root / "metaspace", "metaspace")}


@pytest.mark.parametrize("fam", ["mistral", "gemma2", "gemma3"])
def test_spm_vocab_metadata(spm_bases, tmp_path, fam):
    import gguf

    folder = spm_bases[fam]
    tok_json = json.loads((folder / "tokenizer.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    info = write_model_gguf(folder, tmp_path / "m.gguf", quant="f16")
    f = _read(tmp_path / "m.gguf")
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    assert "tokenizer.ggml.merges" not in f

    vocab = {i: t for t, i in tok_json["model"]["vocab"].items()}
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == cfg["vocab_size"] == len(vocab)
    assert tokens == [vocab[i] for i in range(len(vocab))]
    T = gguf.TokenType
    by_type = {t: [tokens[i] for i in range(len(tokens)) if types[i] == t] for t in set(types)}
    assert by_type[T.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
    assert by_type[T.UNKNOWN] == ["<unk>"]
    gemma = ["<pad>", "<eos>", "<bos>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    specials = {"mistral": ["<s>", "</s>"], "gemma2": gemma, "gemma3": ["<pad>", "<eos>", "<bos>", "<mask>", "<start_of_turn>",
                                                       "<end_of_turn>"]}[fam]
    assert by_type[T.CONTROL] == specials
    assert set(types) == {T.BYTE, T.UNKNOWN, T.CONTROL, T.NORMAL}

    # scores: a piece first made by merge r scores -r; pieces no merge makes rank below all of them
    merges = tok_json["model"]["merges"]
    first = {}
    for rank, m in enumerate(merges):
        first.setdefault("".join(m.split(" ", 1) if isinstance(m, str) else m), rank)
    idx = {t: i for i, t in enumerate(tokens)}
    assert len(first) > 400
    for piece, rank in first.items():
        assert scores[idx[piece]] == -rank, piece
    singles = [scores[i] for i in range(len(tokens)) if types[i] == T.NORMAL and tokens[i] not in first]
    assert singles and max(singles) < -len(merges) + 1
    assert all(scores[idx[t]] == 0.0 for t in by_type[T.BYTE] + by_type[T.CONTROL])

    bos, eos = ("<s>", "</s>") if fam == "mistral" else ("<bos>", "<eos>")
    assert f["tokenizer.ggml.bos_token_id"] == idx[bos] and f["tokenizer.ggml.eos_token_id"] == idx[eos]
    assert f["tokenizer.ggml.unknown_token_id"] == idx["<unk>"]
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    # Llama 2 / Mistral v0.x put "▁" before the text, Gemma does not (llama.cpp's converter: add_space_prefix False)
    assert f["tokenizer.ggml.add_space_prefix"] is (fam == "mistral")
    assert info["tokenizer"]["space_prefix_scheme"] == ("always" if fam == "mistral" else "never")
    assert "chat_template" in " ".join(f) and info["tokenizer"]["byte_tokens"] == 256


def test_metaspace_first_is_written_with_a_note(spm_bases, tmp_path):
    """legacy=False (Metaspace "first"): llama.cpp still prefixes text after special tokens; the record says so."""
    info = write_model_gguf(spm_bases["metaspace"], tmp_path / "m.gguf", quant="f16")
    assert info["tokenizer"]["space_prefix_scheme"] == "first" and info["tokenizer"]["add_space_prefix"] is True
    assert any("follows a special token" in n for n in info["notes"])


def test_mistral_context_length_is_its_window(spm_bases, tmp_path):
    """llama.cpp applies no sliding window to the llama arch: the file declares the window as its context."""
    folder = spm_bases["mistral"]
    info = write_model_gguf(folder, tmp_path / "w.gguf", quant="f16")
    assert _read(tmp_path / "w.gguf")["llama.context_length"] == 8
    assert "sliding window (8 tokens)" in info["notes"][0] and "not 512" in info["notes"][0]
    assert "PARAMETER num_ctx 8\n" in modelfile(model_file="w.gguf", adapter_file=None, folder=folder, label="x")[0]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sliding_window"] = None
    (tmp_path / "nowin").mkdir()
    for p in folder.iterdir():
        (tmp_path / "nowin" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "nowin" / "config.json").write_text(json.dumps(cfg))
    info = write_model_gguf(tmp_path / "nowin", tmp_path / "n.gguf", quant="f16")
    assert _read(tmp_path / "n.gguf")["llama.context_length"] == 512 and info["notes"] == []


def test_spm_refusals(spm_bases, tmp_path):
    folder = tmp_path / "nobytes"
    folder.mkdir()
    for p in spm_bases["gemma3"].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    with pytest.raises(InvalidConfig, match="--gguf-pre 'llama-bpe'"):
        write_model_gguf(folder, tmp_path / "x.gguf", pre="llama-bpe")
    tj = json.loads((folder / "tokenizer.json").read_text())
    del tj["model"]["vocab"]["<0x41>"]
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InvalidConfig, match="lacks byte tokens"):
        write_model_gguf(folder, tmp_path / "y.gguf")
