"""Pre-quantized checkpoints: convert a Mixtral checkpoint once, then load it without re-quantizing.

A pre-quantized directory holds
  * `trunk.safetensors`: embeddings, final norm and lm_head in the model dtype;
  * `layer-NNN.safetensors`, one per layer: the two norms and the router in the model dtype, each attention
    projection as one packed uint8 tensor `model.layers.{l}.self_attn.{proj}` (a `MatrixLayout` buffer), and
    each expert as one packed uint8 tensor `model.layers.{l}.experts.{e}` (an `ExpertLayout` buffer);
  * `offload_manifest.json`: format version, the quant config (`EngineConfig.to_dict()`), model shapes, the
    byte layouts (`layouts.expert`: bits, group size, `ExpertLayout.describe()`; `layouts.attention.{proj}`),
    per file its byte size, and per tensor its file, dtype, shape, CRC-32 and (packed ones) which layout;
  * config.json, generation_config.json and the tokenizer files, copied from the source.

Conversion (convert/): the safetensors headers are computed from the layouts before anything is quantized, so
each tensor is written at its final offset as soon as it exists and dropped (peak RAM ~ one expert's source
weights plus hqq's temporaries). Loading reads each packed expert with one `readinto` straight into its home buffer in the
expert cache (pinned host slot, or the CPU scratch of a device slot): no mmap, no intermediate tensor.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import BinaryIO, NoReturn, Union

import torch
from tqdm.auto import tqdm

from .checkpoint import read_config
from .config import CONFIG_DIR, ConfigError, EngineConfig, load_config, read_yaml
from .engine import MANIFEST, Engine, build_engine, load_tokenizer
from .experts import ExpertLayout
from .model import ATTENTION_PROJECTIONS, OffloadedMixtral, attention_shapes
from .prequantized_io import ST_DTYPES, PrequantizedError, TensorSpec, read_header, read_into
from .quantize import MatrixLayout

FORMAT = "offload_engine.prequantized"
FORMAT_VERSION = 1
FILE_METADATA = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}  # in each safetensors header
TRUNK_FILE = "trunk.safetensors"
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
ConfigLike = Union[None, str, os.PathLike, dict, EngineConfig]


def layer_file(layer: int) -> str:
    return f"layer-{layer:03d}.safetensors"


# ---- what goes where: computed from config.json and the quant config alone ----
def plan_files(hf, cfg: EngineConfig) -> dict[str, list[TensorSpec]]:
    """File name -> its tensors in write order (typed tensors first, so every offset is aligned to its dtype)."""
    dtype, H, V, E = cfg.torch_dtype, hf.hidden_size, hf.vocab_size, hf.num_local_experts
    trunk = [TensorSpec("model.embed_tokens.weight", dtype, (V, H)), TensorSpec("model.norm.weight", dtype, (H,))]
    if not hf.tie_word_embeddings:
        trunk.append(TensorSpec("lm_head.weight", dtype, (V, H)))
    files = {TRUNK_FILE: trunk}
    expert_bytes = ExpertLayout.build(H, hf.intermediate_size, cfg.quant.experts, dtype).nbytes
    attn_bytes = {p: MatrixLayout.build(s, cfg.quant.attention, dtype).nbytes for p, s in attention_shapes(hf).items()}
    for l in range(hf.num_hidden_layers):
        prefix = f"model.layers.{l}"
        files[layer_file(l)] = [
            TensorSpec(f"{prefix}.input_layernorm.weight", dtype, (H,)),
            TensorSpec(f"{prefix}.post_attention_layernorm.weight", dtype, (H,)),
            TensorSpec(f"{prefix}.mlp.gate.weight", dtype, (E, H)),
            *[TensorSpec(f"{prefix}.self_attn.{p}", torch.uint8, (attn_bytes[p],)) for p in ATTENTION_PROJECTIONS],
            *[TensorSpec(f"{prefix}.experts.{e}", torch.uint8, (expert_bytes,)) for e in range(E)],
        ]
    return files


def _describe_matrix(layout: MatrixLayout) -> dict:
    return {"shape": list(layout.shape), "bits": layout.spec.bits, "group_size": layout.spec.group_size,
            "nbytes": layout.nbytes,
            "segments": [{"name": s.name, "dtype": str(s.dtype).removeprefix("torch."), "shape": list(s.shape),
                          "offset": s.offset, "nbytes": s.nbytes} for s in layout.segments]}


def _layouts(hf, cfg: EngineConfig) -> dict:
    """The packed byte layouts as plain data: written into the manifest, compared on load."""
    expert = ExpertLayout.build(hf.hidden_size, hf.intermediate_size, cfg.quant.experts, cfg.torch_dtype)
    return {
        "expert": {"nbytes": expert.nbytes, "bits": expert.spec.bits, "group_size": expert.spec.group_size,
                   "matrices": expert.describe()},
        "attention": {p: _describe_matrix(MatrixLayout.build(s, cfg.quant.attention, cfg.torch_dtype))
                      for p, s in attention_shapes(hf).items()},
    }


MODEL_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")
# config.json fields that change outputs without changing any tensor's shape: recorded too, so that an edited
# config.json is refused by name instead of silently giving other tokens. (Training-only fields such as
# router_jitter_noise or attention_dropout do not matter at inference.)
OUTPUT_KEYS = ("head_dim", "num_experts_per_tok", "rms_norm_eps", "rope_theta", "rope_parameters", "sliding_window",
               "max_position_embeddings", "hidden_act", "eos_token_id")


def _model_summary(hf, raw: dict | None = None) -> dict:
    """The config.json fields the weights depend on, as plain JSON data (compared with the manifest on load).
    `raw`: config.json as written, on load: a top-level rope_theta there (transformers 4 style) is what the user
    sees and edits, even where transformers 5 reads rope_parameters instead."""
    summary = {k: getattr(hf, k) for k in MODEL_KEYS}
    for key in OUTPUT_KEYS:
        summary[key] = getattr(hf, key, None)
    if summary["rope_parameters"] is None:  # older transformers: rope_theta alone
        summary["rope_parameters"] = {"rope_theta": getattr(hf, "rope_theta", None), "rope_type": "default"}
    summary["rope_theta"] = summary["rope_parameters"].get("rope_theta")  # the one in effect
    if raw is not None and "rope_theta" in raw:
        summary["rope_theta"] = raw["rope_theta"]
    return json.loads(json.dumps(summary))  # tuples -> lists, as they read back from the manifest


# ---- loading ----
def _read_manifest(model_dir: Path) -> dict:
    path = model_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrequantizedError(f"{path} is not valid JSON ({e}); the checkpoint is damaged, re-download it") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PrequantizedError(f"{path} is not an offload_engine manifest (format {manifest.get('format')!r})"
                                if isinstance(manifest, dict) else f"{path} is not an offload_engine manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PrequantizedError(
            f"{path} has format version {version!r}, but this offload_engine reads version {FORMAT_VERSION}: "
            f"{'upgrade offload_engine' if isinstance(version, int) and version > FORMAT_VERSION else 're-run quantize'}"
            f" (scripts/quantize.py) to get a checkpoint it can read")
    missing = [k for k in ("config", "model", "layouts", "files", "tensors") if k not in manifest]
    if missing:
        raise PrequantizedError(f"{path} lacks the key(s) {', '.join(missing)}; it is damaged, re-download it")
    for key, kind, what in (("config", dict, "a mapping"), ("model", dict, "a mapping"), ("layouts", dict, "a mapping"),
                            ("files", dict, "a mapping of file names to entries"),
                            ("tensors", dict, "a mapping of tensor names to entries"),
                            ("aux_files", list, "a list of file names")):
        if key in manifest and not isinstance(manifest[key], kind):
            _malformed(path, f"'{key}' must be {what}, got {json.dumps(manifest[key])[:40]}")
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("nbytes"), int):
            _malformed(path, f"the entry of file {name} has no integer 'nbytes'")
    for name, entry in manifest["tensors"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("crc32"), int):
            _malformed(path, f"the entry of tensor {name} has no integer 'crc32'")
    missing = [k for k in MODEL_KEYS if k not in manifest["model"]]
    if missing:
        _malformed(path, f"'model' lacks {', '.join(missing)}")
    return manifest


def _malformed(path: Path, problem: str) -> NoReturn:
    raise PrequantizedError(f"{path} is malformed: {problem}; the checkpoint is damaged, re-download it or quantize "
                            f"the original checkpoint again")


def _explicit_dict(config: ConfigLike) -> dict:
    """The keys a caller actually gave (a dict or YAML may leave some out; an EngineConfig sets them all)."""
    if isinstance(config, EngineConfig):
        return config.to_dict()
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.exists() and (CONFIG_DIR / f"{config}.yaml").exists():
        path = CONFIG_DIR / f"{config}.yaml"
    return read_yaml(path)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _describe_quant(cfg: EngineConfig) -> str:
    def spec(s) -> str:
        if s.bits is None:
            return "unquantized"
        extras = [text for flag, text in ((getattr(s, "quant_meta", True), "16-bit scales/zeros"),
                                          (getattr(s, "optimize", True), "round-to-nearest")) if not flag]
        return f"{s.bits}-bit group {s.group_size}" + "".join(f", {t}" for t in extras)

    return f"dtype {cfg.dtype}, attention {spec(cfg.quant.attention)}, experts {spec(cfg.quant.experts)}"


def resolve_config(manifest: dict, config: ConfigLike, where: Path) -> EngineConfig:
    """The checkpoint's config with the caller's `offload.*` / `max_context`; quant settings and dtype are fixed."""
    try:
        stored = load_config(manifest["config"])
    except ConfigError as e:
        _malformed(where / MANIFEST, f"its 'config' is not a valid engine config ({e})")
    if config is None:
        return stored
    load_config(config)  # validates it, with the usual errors
    cfg = load_config(_merge(stored.to_dict(), _explicit_dict(config)))
    if (cfg.dtype, cfg.quant) != (stored.dtype, stored.quant):
        raise ConfigError(
            f"{where} was quantized with {_describe_quant(stored)}, but the config asks for {_describe_quant(cfg)}. "
            f"A pre-quantized checkpoint fixes dtype and quant: leave them out of the config (only offload.* and "
            f"max_context apply), or quantize the original checkpoint again with the settings you want")
    return cfg


def validate(model_dir: Path, manifest: dict, hf, cfg: EngineConfig) -> dict[str, tuple[int, dict]]:
    """Check every file against the manifest and the layouts this code computes; -> file: (data start, header)."""
    recorded, current = manifest["model"], _model_summary(hf, json.loads((model_dir / "config.json").read_text()))
    shapes = [k for k in MODEL_KEYS if recorded[k] != current[k]]
    if shapes:
        raise PrequantizedError(f"{model_dir / 'config.json'} describes a different model than {MANIFEST} "
                                f"({', '.join(f'{k}: {current[k]} vs {recorded[k]}' for k in shapes)}); the files "
                                f"do not belong together")
    for key in OUTPUT_KEYS:  # a manifest written before a field was recorded does not check it
        if key in recorded and recorded[key] != current[key]:
            raise PrequantizedError(
                f"{model_dir / 'config.json'}: {key} is {json.dumps(current[key])}, but the checkpoint was quantized "
                f"with {key} = {json.dumps(recorded[key])} (recorded in {MANIFEST}); this changes the outputs: "
                f"restore config.json's {key}, or quantize the original checkpoint again")
    if manifest["layouts"] != _layouts(hf, cfg):
        raise PrequantizedError(
            f"the packed layouts in {model_dir / MANIFEST} differ from the ones this offload_engine computes for "
            f"{_describe_quant(cfg)} (written by {manifest.get('created_by')}); quantize the original checkpoint again")
    for name in manifest.get("aux_files", []):
        if not (model_dir / name).exists():
            raise PrequantizedError(f"{name}, listed in {MANIFEST}, is missing from {model_dir}; re-download it")
    headers = {}
    for name, specs in plan_files(hf, cfg).items():
        path, entry = model_dir / name, manifest["files"].get(name)
        if entry is None:
            raise PrequantizedError(f"{model_dir / MANIFEST} does not list {name}, which this model needs; re-download it")
        if not path.exists():
            raise PrequantizedError(f"{name}, listed in {MANIFEST}, is missing from {model_dir}; re-download it")
        start, header = read_header(path)
        for spec in specs:
            expected = {"dtype": ST_DTYPES[spec.dtype], "shape": list(spec.shape)}
            found = header.get(spec.name)
            if found is None:
                raise PrequantizedError(f"{path} has no tensor {spec.name}; the file was edited or is from another "
                                        f"checkpoint, re-download it")
            end0, end1 = found.get("data_offsets", (0, -1))
            if {k: found.get(k) for k in expected} != expected or end1 - end0 != spec.nbytes:
                raise PrequantizedError(f"{path}: tensor {spec.name} is {found.get('dtype')} {found.get('shape')}, "
                                        f"expected {expected['dtype']} {expected['shape']}; the file was edited, re-download it")
            if spec.name not in manifest["tensors"]:
                raise PrequantizedError(f"{model_dir / MANIFEST} has no entry for tensor {spec.name}; re-download it")
        size = path.stat().st_size
        if size != entry["nbytes"]:
            raise PrequantizedError(f"{path} has {size} bytes but {MANIFEST} says {entry['nbytes']}: it is "
                                    f"{'truncated' if size < entry['nbytes'] else 'edited'}; re-download it")
        headers[name] = (start, header)
    return headers


def load_prequantized(model_dir: Path, config: ConfigLike, device: torch.device, progress: bool) -> Engine:
    """Load a directory written by `quantize_checkpoint` (called by `offload_engine.load`)."""
    manifest = _read_manifest(model_dir)
    cfg = resolve_config(manifest, config, model_dir)
    hf = read_config(model_dir)
    headers = validate(model_dir, manifest, hf, cfg)
    plan = plan_files(hf, cfg)

    def read(f: BinaryIO, file: str, name: str, out: torch.Tensor) -> None:
        start, header = headers[file]
        read_into(f, model_dir / file, start + header[name]["data_offsets"][0], out)
        if zlib.crc32(memoryview(out.numpy())) != manifest["tensors"][name]["crc32"]:
            raise PrequantizedError(f"{model_dir / file}: the bytes of {name} do not match their checksum in "
                                    f"{MANIFEST}; the file is corrupt or was edited, re-download it")

    def fresh(f: BinaryIO, file: str, spec: TensorSpec) -> torch.Tensor:
        buffer = torch.empty(spec.nbytes, dtype=torch.uint8)
        read(f, file, spec.name, buffer)
        return buffer.view(spec.dtype).view(spec.shape)

    def fill(model: OffloadedMixtral, layout: ExpertLayout, progress: bool) -> None:
        with open(model_dir / TRUNK_FILE, "rb", buffering=0) as f:
            for spec in plan[TRUNK_FILE]:
                model.set_tensor(spec.name, fresh(f, TRUNK_FILE, spec))
        attention = {p: MatrixLayout.build(s, cfg.quant.attention, cfg.torch_dtype) for p, s in attention_shapes(hf).items()}
        for l in tqdm(range(hf.num_hidden_layers), desc="loading layers", disable=not progress):
            file, prefix = layer_file(l), f"model.layers.{l}"
            with open(model_dir / file, "rb", buffering=0) as f:
                for spec in plan[file][:3]:  # norms and router
                    model.set_tensor(spec.name, fresh(f, file, spec))
                for proj, spec in zip(ATTENTION_PROJECTIONS, plan[file][3:7], strict=True):
                    model.set_attention(l, proj, attention[proj], fresh(f, file, spec))
                for e in range(hf.num_local_experts):  # each expert straight into its home buffer
                    name = f"{prefix}.experts.{e}"
                    model.cache.fill(l, e, lambda buffer, f=f, file=file, name=name: read(f, file, name, buffer))

    engine = build_engine(hf, cfg, device, fill, progress)
    engine.tokenizer = load_tokenizer(model_dir)
    engine.model_dir = model_dir
    return engine


def __getattr__(name: str):
    """`quantize_checkpoint` lives in convert/ (which imports this module); still importable from here."""
    if name == "quantize_checkpoint":
        from .convert import quantize_checkpoint

        return quantize_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
