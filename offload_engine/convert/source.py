"""Where a conversion reads its full-precision shards from: a local directory, or a hub repo fetched shard by shard.

Both give the same view: the checkpoint's small files (config.json, the shard index, tokenizer files) in one
directory, the shard of every tensor (`weight_map`), the size of every shard, and `fetch(shard)` / `release(shard)`.
A hub source downloads a shard when the converter first needs it (huggingface_hub, with a progress bar) into
the conversion's private directory and deletes it on `release`, so at most the shards a pending tensor needs
are on disk at once; `keep_source=True` downloads into the Hugging Face cache instead and keeps them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from ..checkpoint import MANIFEST, CheckpointError, SafetensorsCheckpoint, is_hub_id, resolve_model_dir
from ..prequantized import AUX_FILES
from .journal import naming_a_full_disk

INDEX = "model.safetensors.index.json"
SMALL_FILES = (INDEX, *AUX_FILES)  # fetched first and kept: what the plan and the output need


def _hub_error(repo: str, e: Exception) -> CheckpointError:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return CheckpointError(f"the hub is offline (HF_HUB_OFFLINE is set), so {repo} cannot be downloaded: unset "
                               f"HF_HUB_OFFLINE, with a network, to convert it, or pass a local directory")
    return CheckpointError(f"could not reach {repo!r} on the Hugging Face hub ({type(e).__name__}: {e}); check the "
                           f"repo id, your network, and `huggingface-cli login` for gated repos")


class LocalSource:
    """A checkpoint directory already on disk: nothing to fetch or delete."""

    def __init__(self, model: str | os.PathLike):
        self.dir = resolve_model_dir(model)
        if (self.dir / MANIFEST).exists():  # before reading its shards, which hold packed tensors
            raise CheckpointError(f"{self.dir} is already a pre-quantized checkpoint; load it directly, or convert "
                                  f"the original")
        self.name = str(self.dir)
        self.identity = {"path": str(self.dir.resolve())}
        self.checkpoint = SafetensorsCheckpoint(self.dir)  # checks every shard is there and complete
        self.weight_map = {name: file.name for name, file in self.checkpoint.file_of.items()}
        self.sizes = {f: (self.dir / f).stat().st_size for f in sorted(set(self.weight_map.values()))}
        self.missing: set[str] = set()  # shards not on disk yet (none: everything is local)

    def prepare(self, workdir: Path, progress: bool) -> None:
        pass

    def fetch(self, shard: str) -> Path:
        return self.dir / shard

    def release(self, shard: str) -> None:
        pass


class HubSource:
    """A hub repo: small files first, then each shard on demand, deleted after use unless `keep_source`."""

    def __init__(self, repo: str, revision: str | None = None, keep_source: bool = False,
                 cache_dir: str | os.PathLike | None = None):
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        try:
            info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        except (HfHubHTTPError, OSError) as e:
            raise _hub_error(repo, e) from e
        files = {s.rfilename: s.size for s in info.siblings or []}
        if MANIFEST in files:
            raise CheckpointError(f"{repo} is already a pre-quantized checkpoint; load it directly "
                                  f"(offload_engine.load({repo!r})), or convert the original")
        if "config.json" not in files:
            raise CheckpointError(f"{repo} on the hub has no config.json: it is not a Hugging Face model repo")
        shards = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        if not shards:
            raise CheckpointError(f"{repo} has no *.safetensors files (pickled .bin checkpoints are not read)")
        if len(shards) > 1 and INDEX not in files:
            raise CheckpointError(f"{repo} has {len(shards)} shards but no {INDEX}; cannot tell which holds what")
        self.repo, self.revision, self.keep_source, self.cache_dir = repo, info.sha, keep_source, cache_dir
        self.name = f"{repo}@{info.sha[:12]}" if info.sha else repo
        self.identity = {"repo": repo, "revision": info.sha}
        self.small = [f for f in SMALL_FILES if f in files]
        self.sizes = {f: files[f] if files[f] is not None else self._head_size(f) for f in shards}
        self.weight_map: dict[str, str] = {}
        self.dir = self.source_dir = None
        self.missing = set(shards)

    def _head_size(self, filename: str) -> int:
        """A file's size from a HEAD request, for a hub whose file list leaves sizes out."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return get_hf_file_metadata(hf_hub_url(self.repo, filename, revision=self.revision)).size or 0
        except (HfHubHTTPError, OSError) as e:
            raise _hub_error(self.repo, e) from e

    def _download(self, filename: str, local_dir: Path | None, progress: bool) -> Path:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        quiet = None if progress else _Silent
        folder = local_dir or Path(self.cache_dir or constants.HF_HUB_CACHE) / f"models--{self.repo.replace('/', '--')}"
        try:
            with naming_a_full_disk(folder / filename, self.sizes.get(filename, 0)):
                if local_dir is None:
                    return Path(hf_hub_download(self.repo, filename, revision=self.revision,
                                                cache_dir=self.cache_dir, tqdm_class=quiet))
                return Path(hf_hub_download(self.repo, filename, revision=self.revision, local_dir=local_dir,
                                            tqdm_class=quiet))
        except (HfHubHTTPError, OSError) as e:
            raise _hub_error(self.repo, e) from e

    def prepare(self, workdir: Path, progress: bool) -> None:
        """Fetch the small files into `workdir/source` (kept there, so a resumed run asks for nothing again)."""
        self.source_dir, self._progress = workdir / "source", progress
        for leftover in self.source_dir.glob(".cache/huggingface/download/**/*.incomplete"):
            leftover.unlink()  # a download cut by a kill; huggingface_hub cannot resume it, so start it over
        for f in self.small:
            self._download(f, self.source_dir, progress)
        self.dir = self.source_dir
        if INDEX in self.small:
            self.weight_map = json.loads((self.dir / INDEX).read_text())["weight_map"]
        else:  # a single shard: its header (a ranged request, not the whole file) says what it holds
            from huggingface_hub import HfApi
            from huggingface_hub.errors import HfHubHTTPError

            (shard,) = self.sizes
            try:
                header = HfApi().parse_safetensors_file_metadata(self.repo, shard, revision=self.revision)
            except (HfHubHTTPError, OSError) as e:
                raise _hub_error(self.repo, e) from e
            self.weight_map = {name: shard for name in header.tensors}
        used = set(self.weight_map.values())  # e.g. a consolidated.safetensors beside the shards is not read
        self.sizes = {s: n for s, n in self.sizes.items() if s in used}
        self.missing = {s for s in self.sizes if not self._on_disk(s)}

    def _on_disk(self, shard: str) -> bool:
        if not self.keep_source:
            return (self.source_dir / shard).exists()
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(self.repo, shard, self.cache_dir, self.revision), str)

    def fetch(self, shard: str) -> Path:
        path = self._download(shard, None if self.keep_source else self.source_dir, self._progress)
        self.missing.discard(shard)
        return path

    def release(self, shard: str) -> None:
        if not self.keep_source:
            (self.source_dir / shard).unlink(missing_ok=True)


class _Silent(tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def open_source(src: str | os.PathLike, keep_source: bool = False, revision: str | None = None,
                cache_dir: str | os.PathLike | None = None) -> LocalSource | HubSource:
    if is_hub_id(src):
        return HubSource(str(src), revision, keep_source, cache_dir)
    return LocalSource(src)
