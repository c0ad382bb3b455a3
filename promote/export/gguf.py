"""``--format gguf`` and ``--format gguf-lora``: write, read back, and (with llama-cpp-python) run.

gguf:       OUT/<name>.<quant>.gguf             the merged model
gguf-lora:  OUT/<adapter>.lora.<dtype>.gguf     the adapter as a GGUF LoRA
            OUT/<base>.f16.gguf                 the base it applies over (llama.cpp needs both)

Runtime check (recorded; skipped, saying the file was not run, when llama-cpp-python
is absent: it is the optional ``loradex[llamacpp]`` extra):
f16/f32 must reproduce transformers' greedy tokens exactly; q8_0 must reach the
teacher-forced top-1 agreement ``--min-agreement``; a GGUF LoRA over the f16 base
must reproduce base + adapter exactly.
"""
from __future__ import annotations

from pathlib import Path

from loradex.hub import quiet
from loradex.hub.errors import CheckFailed
from loradex.promote.export import gguf_lora, gguf_writer, llamacpp_check
from loradex.promote.export.source import ExportOptions, ExportResult, ExportSource


# GGUF value types (spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
KEEP_KEYS = ("general.architecture", "general.type", "tokenizer.ggml.pre", "tokenizer.ggml.model",
             "tokenizer.ggml.add_bos_token", "adapter.type", "adapter.lora.alpha", "general.file_type")


def read_back(path: Path, *, full: bool = False) -> dict:
    """Static check: parse the header (key/values and tensor infos) and report what the file holds.

    ``full`` adds every key (``fields``; arrays of up to 64 numbers decoded, longer ones
    summarized) and each tensor's shape, type and absolute data offset (``tensor_infos``).

    A small reader of the documented format: ``gguf.GGUFReader`` builds a numpy view per
    vocabulary entry and takes seconds on a 49k-token file; this walks it in ~0.1 s.
    """
    import mmap
    import struct

    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _parse(data, gguf, struct, full)


def _parse(data, gguf, struct, full: bool = False) -> dict:  # noqa: C901 - one pass over the documented layout
    pos = 0

    def take(fmt: str):
        nonlocal pos
        val = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return val

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n: pos].decode("utf-8", errors="replace")

    def value(vtype: int):
        nonlocal pos
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            itype, n = take("<I"), take("<Q")
            if itype == _STRING:
                for _ in range(n):
                    skip = take("<Q")
                    pos += skip
                return f"<{n} strings>"
            size = struct.calcsize(_SCALARS[itype])
            if full and n <= 64:
                return [take(_SCALARS[itype]) for _ in range(n)]
            pos += size * n
            return f"<{n} values>"
        return take(_SCALARS[vtype])

    if data[:4] != b"GGUF":
        return {"parses": False, "reason": "not a GGUF file (bad magic)"}
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    kv, fields = {}, {}
    for _ in range(n_kv):
        key = string()
        val = value(take("<I"))
        if key in KEEP_KEYS:
            kv[key] = val
        if full:
            fields[key] = val
    kinds: dict[str, int] = {}
    infos = {}
    for _ in range(n_tensors):
        name = string()
        n_dims = take("<I")
        shape = [take("<Q") for _ in range(n_dims)]
        kind = gguf.GGMLQuantizationType(take("<I")).name
        offset = take("<Q")
        kinds[kind] = kinds.get(kind, 0) + 1
        infos[name] = {"shape": shape, "type": kind, "offset": offset}
    if full:
        align = fields.get("general.alignment", 32)
        start = pos + (-pos % align)
        for info in infos.values():
            info["offset"] += start
        extra = {"fields": fields, "tensor_infos": infos}
    else:
        extra = {}
    return {**extra, "parses": True, "version": version, "tensors": n_tensors, "tensor_types": kinds,
            "architecture": kv.get("general.architecture"), "type": kv.get("general.type"),
            "metadata": kv}


def _probe_texts(src: ExportSource) -> list[str]:
    from loradex.promote.merge import FIXED_PROBES

    return src.probes or list(FIXED_PROBES)


def _runtime(opts: ExportOptions, run) -> dict:
    if not opts.run_check:
        return {"skipped": "--no-run-check"}
    if not llamacpp_check.available():
        return {"skipped": f"llama-cpp-python is not installed, so the GGUF was NOT run, only read back; "
                           f"add the check with {llamacpp_check.INSTALL}"}
    result = run()
    if not result.get("ok"):
        raise CheckFailed(f"llama.cpp check failed: {_numbers(result)}; the export was not registered")
    return result


def _numbers(r: dict) -> str:
    if "reason" in r:
        return f"{r['reason']} ({r['prompt_ids_equal']}/{r['probes']} prompts equal)"
    if r["mode"] == "exact":
        return (f"{r['exact_probes']}/{r['probes']} probes identical, {r['equal_tokens']}/{r['tokens']} tokens equal, "
                f"first differences at {r.get('first_diff')}")
    tf = r["teacher_forced"]
    return f"teacher-forced top-1 {tf['match']}/{tf['of']} ({tf['rate']:.3f}) < {r['min_agreement']}"


def write_merged_gguf(src: ExportSource, out: Path, opts: ExportOptions) -> tuple[Path, dict, dict]:
    """Write the merged GGUF, read it back and run it; (path, writer info, check)."""
    path = out / f"{src.merge['base_name']}.{opts.quant}.gguf"
    info = gguf_writer.write_model_gguf(src.merged_dir, path, quant=opts.quant, name=src.merge["base_name"],
                                        pre=opts.pre)

    def run() -> dict:
        from loradex.hub.loading import load_model_folder, load_tokenizer
        from loradex.promote.merge import eos_ids

        model, _, _ = load_model_folder(src.merged_dir, device="cpu", dtype="fp32")
        tok = load_tokenizer(src.merged_dir)
        mode = "teacher_forced" if opts.quant == "q8_0" else "exact"
        return llamacpp_check.compare(path, model, tok, _probe_texts(src), mode=mode, n_tokens=opts.check_tokens,
                                      eos=eos_ids(tok, str(src.merged_dir)), min_agreement=opts.min_agreement)

    check = {"static": read_back(path), "runtime": _runtime(opts, run)}
    return path, info, check


def export_gguf(src: ExportSource, out: Path, opts: ExportOptions) -> ExportResult:
    path, info, check = write_merged_gguf(src, out, opts)
    check["writer"] = info
    return ExportResult(method=info["method"], check=check, primary=path.name,
                        command=f"llama-cli -m {path} -cnv", notes=list(info["notes"]))


def write_lora_gguf(src: ExportSource, out: Path, dtype: str, *, run_check: bool, opts: ExportOptions
                    ) -> tuple[Path, Path, dict]:
    """Adapter GGUF plus the f16 base GGUF it applies over; (adapter path, base path, check)."""
    base_path = out / f"{src.base['name']}.f16.gguf"
    base_info = gguf_writer.write_model_gguf(src.base_dir, base_path, quant="f16", name=src.base["name"],
                                             pre=opts.pre)
    lora_path = out / f"{src.version['adapter']}-v{src.version['version']}.lora.{dtype}.gguf"
    info = gguf_lora.write_lora_gguf(src.adapter_dir, src.base["config"], lora_path, dtype=dtype,
                                     base_name=src.base["name"], name=f"{src.version['adapter']}-v{src.version['version']}")

    def run() -> dict:
        quiet.install()
        from peft import PeftModel

        from loradex.hub.loading import load_model_folder, load_tokenizer
        from loradex.promote.merge import eos_ids

        model, _, _ = load_model_folder(src.base_dir, device="cpu", dtype="fp32")
        model = PeftModel.from_pretrained(model, str(src.adapter_dir), is_trainable=False).eval()
        tok = load_tokenizer(src.base_dir)
        return llamacpp_check.compare(base_path, model, tok, _probe_texts(src), mode="exact",
                                      n_tokens=opts.check_tokens, eos=eos_ids(tok, str(src.base_dir)),
                                      lora=lora_path)

    opts_for_run = opts if run_check else ExportOptions(format=opts.format, run_check=False)
    check = {"static": read_back(lora_path), "base_static": read_back(base_path), "writer": info,
             "base_writer": {k: v for k, v in base_info.items() if k != "tokenizer"},
             "runtime": _runtime(opts_for_run, run)}
    return lora_path, base_path, check


def export_gguf_lora(src: ExportSource, out: Path, opts: ExportOptions) -> ExportResult:
    lora_path, base_path, check = write_lora_gguf(src, out, opts.quant, run_check=opts.run_check, opts=opts)
    return ExportResult(method=check["writer"]["method"], check=check, primary=lora_path.name,
                        command=f"llama-cli -m {base_path} --lora {lora_path} -cnv",
                        notes=list(check["base_writer"]["notes"]))
