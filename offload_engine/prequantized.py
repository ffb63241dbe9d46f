"""Pre-quantized checkpoints: convert an MoE checkpoint once, then load it without re-quantizing.

A pre-quantized directory holds
  * `trunk.safetensors`: embeddings, final norm and lm_head in the model dtype;
  * `layer-NNN.safetensors`, one per layer: its plain tensors (norms, router, biases, sinks) in the model dtype
    (or float32 where the family keeps them so), each quantized linear layer (attention projections; shared
    experts and dense MLPs) as one packed uint8 tensor named by its module, e.g. `model.layers.{l}.self_attn.q_proj`
    (a `MatrixLayout` buffer), and in MoE layers each expert as one packed uint8 tensor
    `model.layers.{l}.experts.{e}` (an `ExpertLayout` buffer);
  * `offload_manifest.json`: format version, the family (`model_type`), the quant config
    (`EngineConfig.to_dict()`), model shapes, the byte layouts (`layouts.expert`: bits, group size,
    `ExpertLayout.describe()`; `layouts.attention.{proj}`; `layouts.trunk.{module}`), per file its byte size, and
    per tensor its file, dtype, shape, CRC-32 and (packed ones) which layout;
  * config.json, generation_config.json and the tokenizer files, copied from the source.

Conversion (convert/): the safetensors headers are computed from the layouts before anything is quantized, so
each tensor is written at its final offset as soon as it exists and dropped (peak RAM ~ one expert's source
weights plus hqq's temporaries). Loading reads each packed expert with one `readinto` straight into its home buffer in the
expert cache (pinned host slot, or the CPU scratch of a device slot): no mmap, no intermediate tensor.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, NoReturn

import torch
from tqdm.auto import tqdm

from .anatomy import Anatomy
from .checkpoint import MANIFEST, read_config
from .config import ConfigError, ConfigLike, EngineConfig, explicit_keys, load_config
from .experts import ExpertLayout
from .model import OffloadedModel
from .prequantized_io import (ST_DTYPES, PrequantizedError, TensorSpec, check_manifest_entries, read_header,
                              read_into)
from .quantize import MatrixLayout

FORMAT = "offload_engine.prequantized"
FORMAT_VERSION = 1
FILE_METADATA = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}  # in each safetensors header
TRUNK_FILE = "trunk.safetensors"
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def layer_file(layer: int) -> str:
    return f"layer-{layer:03d}.safetensors"


# ---- what goes where: computed from config.json and the quant config alone ----
def plan_files(hf, cfg: EngineConfig) -> dict[str, list[TensorSpec]]:
    """File name -> its tensors in write order (typed tensors first, so every offset is aligned to its dtype)."""
    anatomy = Anatomy.of(hf, cfg.torch_dtype)
    files: dict[str, list[TensorSpec]] = {TRUNK_FILE: []}
    files.update({layer_file(l): [] for l in range(hf.num_hidden_layers)})
    for t in anatomy.trunk:
        spec = (TensorSpec(t.name, t.dtype(cfg), t.shape) if t.part is None
                else TensorSpec(t.name, torch.uint8, (t.nbytes(cfg),)))
        files[TRUNK_FILE if t.layer is None else layer_file(t.layer)].append(spec)
    expert_bytes = anatomy.expert_layout(cfg).nbytes
    for l in anatomy.moe_layers:
        files[layer_file(l)] += [TensorSpec(f"model.layers.{l}.experts.{e}", torch.uint8, (expert_bytes,))
                                 for e in range(anatomy.num_experts)]
    return files


def _describe_matrix(layout: MatrixLayout) -> dict:
    return {"shape": list(layout.shape), "bits": layout.spec.bits, "group_size": layout.spec.group_size,
            "nbytes": layout.nbytes,
            "segments": [s.describe() for s in layout.segments]}


def layout_key(name: str) -> str:
    """A packed trunk tensor's key under `layouts` (and its manifest entry's `layout`): `attention.q_proj` for
    'model.layers.3.self_attn.q_proj', `trunk.mlp.shared_experts.up_proj` for the others."""
    within = name.split(".", 3)[3]
    return f"attention.{within.removeprefix('self_attn.')}" if within.startswith("self_attn.") else f"trunk.{within}"


def tensor_layout(name: str) -> str:
    """A packed tensor's `layout` entry in the manifest: `expert`, or its key under `layouts`."""
    return "expert" if ".experts." in name else layout_key(name)


def _layouts(hf, cfg: EngineConfig) -> dict:
    """The packed byte layouts as plain data: written into the manifest, compared on load."""
    anatomy = Anatomy.of(hf, cfg.torch_dtype)
    expert = anatomy.expert_layout(cfg)
    layouts = {"expert": {"nbytes": expert.nbytes, "bits": expert.spec.bits, "group_size": expert.spec.group_size,
                          "matrices": expert.describe()}, "attention": {}}
    for t in anatomy.quantized():
        part, key = layout_key(t.name).split(".", 1)
        layouts.setdefault(part, {})[key] = _describe_matrix(t.layout(cfg))
    return layouts


MODEL_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")  # None where a family has no such key
# config.json fields that change outputs without changing any tensor's shape: recorded too, so that an edited
# config.json is refused by name instead of silently giving other tokens. (Training-only fields such as
# router_jitter_noise or attention_dropout do not matter at inference.)
OUTPUT_KEYS = ("head_dim", "num_experts_per_tok", "rms_norm_eps", "rope_theta", "rope_parameters", "sliding_window",
               "max_position_embeddings", "hidden_act", "eos_token_id",
               # other families' shapes and routing (recorded by manifests that have them)
               "num_experts", "n_routed_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
               "n_shared_experts", "first_k_dense_replace", "mlp_only_layers", "decoder_sparse_step", "layer_types",
               "norm_topk_prob", "routed_scaling_factor", "topk_method", "n_group", "topk_group", "swiglu_limit",
               "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _model_summary(hf, raw: dict | None = None) -> dict:
    """The config.json fields the weights depend on, as plain JSON data (compared with the manifest on load).
    `raw`: config.json as written, on load: a top-level rope_theta there (transformers 4 style) is what the user
    sees and edits, even where transformers 5 reads rope_parameters instead."""
    summary = {k: getattr(hf, k, None) for k in MODEL_KEYS}
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
    """The checkpoint's config with the caller's `offload.*`, `max_context`, `max_batch` and `kernels`; quant
    settings and dtype are fixed."""
    try:
        stored = load_config(manifest["config"])
    except ConfigError as e:
        _malformed(where / MANIFEST, f"its 'config' is not a valid engine config ({e})")
    if config is None:
        return stored
    load_config(config)  # validates it, with the usual errors
    cfg = load_config(_merge(stored.to_dict(), explicit_keys(config)))
    if (cfg.dtype, cfg.quant) != (stored.dtype, stored.quant):
        raise ConfigError(
            f"{where} was quantized with {_describe_quant(stored)}, but the config asks for {_describe_quant(cfg)}. "
            f"A pre-quantized checkpoint fixes dtype and quant: leave them out of the config (only offload.*, "
            f"max_context, max_batch and kernels apply), or quantize the original checkpoint again with the settings you want")
    return cfg


def validate(model_dir: Path, manifest: dict, hf, cfg: EngineConfig) -> dict[str, tuple[int, dict]]:
    """Check every file against the manifest and the layouts this code computes; -> file: (data start, header)."""
    family = manifest.get("family", "mixtral")  # written before other families existed: Mixtral
    if family != hf.model_type:
        raise PrequantizedError(f"{model_dir / 'config.json'} describes a {hf.model_type!r} model, but {MANIFEST} was "
                                f"written for a {family!r} one; the files do not belong together")
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
    plan = plan_files(hf, cfg)
    check_manifest_entries(model_dir, MANIFEST, manifest, plan, AUX_FILES, tensor_layout)
    for name in manifest.get("aux_files", []):
        if not (model_dir / name).exists():
            raise PrequantizedError(f"{name}, listed in {MANIFEST}, is missing from {model_dir}; re-download it")
    headers = {}
    for name, specs in plan.items():
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


def open_prequantized(model_dir: Path, config: ConfigLike) -> tuple[object, EngineConfig, Callable]:
    """Check a directory written by `quantize_checkpoint` against its manifest; -> (config.json's config, the
    engine config in effect, the loader that fills a model with its bytes), for `loader.build_engine`."""
    manifest = _read_manifest(model_dir)
    cfg = resolve_config(manifest, config, model_dir)
    hf = read_config(model_dir)
    headers = validate(model_dir, manifest, hf, cfg)
    return hf, cfg, prequantized_loader(model_dir, manifest, headers, hf, cfg)


def prequantized_loader(model_dir: Path, manifest: dict, headers: dict[str, tuple[int, dict]], hf,
                        cfg: EngineConfig) -> Callable[[OffloadedModel, ExpertLayout, bool], None]:
    """Fill a model from the checked files: every tensor read into place and compared with its CRC-32."""
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

    def fill(model: OffloadedModel, layout: ExpertLayout, progress: bool) -> None:
        with open(model_dir / TRUNK_FILE, "rb", buffering=0) as f:
            for spec in plan[TRUNK_FILE]:
                model.set_tensor(spec.name, fresh(f, TRUNK_FILE, spec), spec.dtype)
        packed = {t.name: t.layout(cfg) for t in model.anatomy.quantized()}
        moe_index = {l: m for m, l in enumerate(model.anatomy.moe_layers)}
        for l in tqdm(range(hf.num_hidden_layers), desc="loading layers", disable=not progress):
            file = layer_file(l)
            with open(model_dir / file, "rb", buffering=0) as f:
                for spec in plan[file]:
                    if spec.name in packed:
                        model.set_linear(spec.name, packed[spec.name], fresh(f, file, spec))
                    elif ".experts." in spec.name:  # each expert straight into its home buffer
                        e = int(spec.name.rsplit(".", 1)[1])
                        model.fill_expert(moe_index[l], e, lambda buffer, f=f, file=file, name=spec.name:
                                          read(f, file, name, buffer))
                    else:
                        model.set_tensor(spec.name, fresh(f, file, spec), spec.dtype)

    return fill
