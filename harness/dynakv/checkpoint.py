"""DynaKV checkpoints: per-layer PCA bases (and, once trained, gates) of a model's K and V, in one
safetensors file with its manifest (reference-dynakv.md sections 2 and 3).

Tensors, one set per model layer ``L`` and ``kind`` in ``k``/``v``:

* ``layers.L.kind.basis`` ``[d, d]`` (column ``i`` is direction ``i``): ``U``, the PCA eigenvectors, or after
  ``kvh dynakv train --basis train`` the trained ``U``; ``layers.L.kind.eigenvalues`` ``[d]`` (always the
  calibration's), ``layers.L.kind.mean`` ``[d]`` (centred bases only);
* ``layers.L.kind.gate.weight`` ``[d, d]`` and ``layers.L.kind.gate.bias`` ``[d]`` (trained checkpoints only).

The manifest (JSON) is stored twice: in the file's safetensors metadata (``manifest``), so a file is never
separated from its record, and beside it as ``<stem>.json`` for reading. It records the model, the data and
token counts, and for a trained checkpoint ``alpha``, the steps and the retain rate measured after saving, and
``basis`` (``pca`` or ``trained``) and ``reconstruction`` (``inverse``: ``U^-1``; ``transpose``: ``U^T``), the
reconstruction the gates (and a trained ``U``) were trained with. Every transform built on the checkpoint
(``transforms_for``) reconstructs that way; a checkpoint without the key (a calibration, or one trained before
the key existed, with ``inverse``) reconstructs with ``inverse``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.config import reference_dir
from methods import ConfigError
from methods.base import TRANSFORM_KNOBS
from methods.lowrank import Basis, TokenGate, build_transform, transforms_on

FORMAT = "kv-harness/dynakv-checkpoint/1"


def shipped_dir() -> Path:
    """Where checkpoints shipped with the harness live: ``results/reference/dynakv/`` (``harness/reference``
    in a wheel)."""
    return reference_dir() / "dynakv"


def shipped(model_name: str) -> Path:
    """The checkpoint shipped for the model config ``model_name``: ``<shipped_dir>/<model_name>.safetensors``."""
    return shipped_dir() / f"{model_name}.safetensors"


def resolve(checkpoint: str, model_name: str) -> Path:
    """The file ``checkpoint`` names (``auto``: the one shipped for ``model_name``). ConfigError naming the
    shipped ones and the fix when it does not exist."""
    path = shipped(model_name) if checkpoint == "auto" else Path(str(checkpoint)).expanduser()
    if path.is_file():
        return path
    available = sorted(p.stem for p in shipped_dir().glob("*.safetensors")) if shipped_dir().is_dir() else []
    if checkpoint == "auto":
        raise ConfigError(f"method.transform_checkpoint=auto: no DynaKV checkpoint is shipped for model {model_name} "
                          f"(shipped for: {available or 'none'}); fix: `kvh dynakv calibrate --model {model_name} ...` "
                          "(and `kvh dynakv train` for the gates), then method.transform_checkpoint=<that file>")
    raise ConfigError(f"method.transform_checkpoint={checkpoint!r} is not a file; fix: a file written by `kvh dynakv "
                      "calibrate`/`kvh dynakv train`, or auto (the one shipped for the model)")


def weight_files(identity: dict) -> set | None:
    """The sha256 of the weight files a model identity's ``weights`` names (a GGUF file; a package's files),
    or None where the weights are not files (hub, local folder, random): those compare as whole records."""
    weights = identity.get("weights", {})
    if weights.get("source") == "gguf":
        return {weights["sha256"]}
    if weights.get("source") == "package" and weights.get("files_sha256"):
        return set(weights["files_sha256"])
    return None


def check_model(path: Path, manifest: dict, model_cfg) -> None:
    """Before the model loads: the checkpoint was made from the weights ``model_cfg`` loads (the same GGUF /
    package file by sha256, or the same hub id, folder or random seed). ConfigError naming both otherwise."""
    from harness.engine.models import weights_fingerprint
    mine = weights_fingerprint(model_cfg)
    if mine.get("source") == "package":
        mine = {**mine, "files_sha256": package_file_hashes(model_cfg)}
    theirs = manifest.get("model", {}).get("identity", {})
    a, b = weight_files(theirs), weight_files({"weights": mine})
    same = bool(a & b) if a is not None and b is not None else theirs.get("weights") == mine
    if not same:
        raise ConfigError(f"{path} was made from other weights ({theirs.get('weights')}) than model "
                          f"{model_cfg.name} loads ({mine}); its bases and gates would not fit; fix: a checkpoint "
                          f"made with `kvh dynakv calibrate/train --model {model_cfg.name}`")


def package_file_hashes(model_cfg) -> list[str]:
    """The sha256 of each weight file of a packaged model (the files ``weights_fingerprint`` digests)."""
    import importlib.util

    from harness.engine.models import memo_sha256
    folder = Path(importlib.util.find_spec(str(model_cfg.package)).origin).parent
    return [memo_sha256(p) for p in sorted(folder.glob(model_cfg.get("file") or "*.gguf"))]


def save(path, bases: dict, manifest: dict, gates: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``bases`` (model layer -> {"k"/"v": ``Basis``}) and ``gates`` (same keys -> ``TokenGate``, or None)
    in ``dtype`` with ``manifest`` to ``path`` (``.safetensors``) and ``<stem>.json``; returns the path. The
    file is written under a temporary name and renamed, so an interrupted save leaves no partial file."""
    from safetensors.torch import save_file
    path = Path(path)
    tensors = {}
    for layer, pair in bases.items():
        for kind, basis in pair.items():
            prefix = f"layers.{layer}.{kind}"
            tensors[f"{prefix}.basis"] = basis.vectors.to(dtype).contiguous()
            tensors[f"{prefix}.eigenvalues"] = basis.eigenvalues.to(torch.float32).contiguous()
            if basis.mean is not None:
                tensors[f"{prefix}.mean"] = basis.mean.to(dtype).contiguous()
            gate = (gates or {}).get(layer, {}).get(kind)
            if gate is not None:
                tensors[f"{prefix}.gate.weight"] = gate.weight.detach().to(dtype).contiguous()
                tensors[f"{prefix}.gate.bias"] = gate.bias.detach().to(dtype).contiguous()
    record = {"format": FORMAT, "dtype": str(dtype).removeprefix("torch."), "trained": bool(gates), **manifest}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata={"manifest": json.dumps(record)})
    tmp.chmod(0o644)            # safetensors writes 0600; a checkpoint is meant to be shared
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return path


def load(path) -> tuple[dict, dict, dict]:
    """``(bases, gates, manifest)`` from a checkpoint: model layer -> {"k"/"v": ``Basis`` (float32)}, the
    same keys -> ``TokenGate`` (float32; empty for an untrained checkpoint), and the manifest. ConfigError
    for a file that is not a DynaKV checkpoint."""
    from safetensors import safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:   # safetensors raises its own error types for a damaged or foreign file
        raise ConfigError(f"{path}: not a readable safetensors file ({error}); fix: a file from `kvh dynakv "
                          "calibrate`/`kvh dynakv train`") from None
    try:
        manifest = json.loads(meta["manifest"])
        assert manifest.get("format") == FORMAT
    except (KeyError, ValueError, AssertionError):
        raise ConfigError(f"{path}: no DynaKV manifest (format {FORMAT}) in its metadata; fix: a file from `kvh "
                          "dynakv calibrate`/`kvh dynakv train`") from None
    bases: dict = {}
    gates: dict = {}
    for key in tensors:
        parts = key.split(".")
        if parts[-1] != "basis":
            continue
        layer, kind = int(parts[1]), parts[2]
        prefix = f"layers.{layer}.{kind}"
        mean = tensors.get(f"{prefix}.mean")
        bases.setdefault(layer, {})[kind] = Basis(tensors[key].float(), tensors[f"{prefix}.eigenvalues"].float(),
                                                  None if mean is None else mean.float())
        if f"{prefix}.gate.weight" in tensors:
            gate = TokenGate(tensors[key].shape[0])
            with torch.no_grad():
                gate.weight.copy_(tensors[f"{prefix}.gate.weight"].float())
                gate.bias.copy_(tensors[f"{prefix}.gate.bias"].float())
            gates.setdefault(layer, {})[kind] = gate
    return dict(sorted(bases.items())), dict(sorted(gates.items())), manifest


def transforms_for(knobs: dict, model, checkpoint: Path | None) -> dict:
    """The per-layer transforms of a method's knobs (``transform``, ``transform_rate``/``_eta``/``_tau``) on
    ``model``: model layer -> {"k": t, "v": t}. ``svd_weights`` factorises the model's own ``k_proj``/``v_proj``;
    the others read their bases (and ``dynakv`` its gates) from ``checkpoint``, whose layers and widths must
    be the model's, and reconstruct as it records (``reconstruction_of``). Raises ConfigError for a checkpoint
    that does not fit the model, has no gates for ``dynakv``, or was trained with another reconstruction than
    ``knobs`` asks for."""
    from harness.engine.hook import all_attention_modules
    from harness.engine.transform import joint_widths
    name = knobs["transform"]
    attention = all_attention_modules(model)
    if name == "svd_weights":
        out = {}
        for layer, module in attention.items():
            out[layer] = {kind: build_transform(name, rate=knobs["transform_rate"]).fit_weight(
                proj.weight, getattr(proj, "bias", None)) for kind, proj in (("k", module.k_proj), ("v", module.v_proj))}
        return out
    bases, gates, manifest = load(checkpoint)
    widths = joint_widths(model)
    if sorted(bases) != sorted(attention) or any(bases[layer][kind].vectors.shape[0] != widths[layer]
                                                 for layer in bases for kind in bases[layer]):
        raise ConfigError(f"{checkpoint} was made for {manifest.get('model', {}).get('name', 'another model')} "
                          f"({len(bases)} layers), not this model ({len(attention)} layers, K/V widths "
                          f"{sorted(set(widths.values()))}); fix: a checkpoint of this model")
    if name == "dynakv" and not gates:
        raise ConfigError(f"transform=dynakv needs trained gates, and {checkpoint} holds only PCA bases (from `kvh dynakv "
                          "calibrate`); fix: `kvh dynakv train` it, or use method=pca_uniform / method=energy with it")
    knob = TRANSFORM_KNOBS[name]
    return transforms_on(bases, name, lambda layer: attention[layer].k_proj.weight.device,   # each layer's device
                         gates, reconstruction=reconstruction_of(checkpoint, manifest, knobs),
                         **{knob.removeprefix("transform_"): knobs.get(knob)})


def reconstruction_of(checkpoint: Path, manifest: dict, knobs: dict) -> str:
    """How transforms on ``checkpoint`` reconstruct: the ``reconstruction`` its ``manifest`` records (what its gates
    and a trained ``U`` were trained with), else a ``transform_reconstruction`` of ``knobs``, else ``inverse``. A
    knob that disagrees with a recorded value is refused (ConfigError naming both and the fix): a trained basis
    is only right with the reconstruction it was trained with (a free ``U`` is not orthogonal, so ``U^T`` is not
    its inverse), and the gates learnt their cut-offs through it. (``methods.base.TRANSFORM_FIELDS`` has no such
    knob today, so a run always gets the recorded value.)"""
    recorded, asked = manifest.get("reconstruction"), knobs.get("transform_reconstruction")
    if recorded is not None and asked is not None and asked != recorded:
        raise ConfigError(f"transform_reconstruction={asked!r}, but {checkpoint} was trained with reconstruction="
                          f"{recorded!r} (basis: {manifest.get('basis', 'pca')}); its gates and basis are only right "
                          f"with it; fix: transform_reconstruction={recorded!r}, or leave it unset")
    return recorded or asked or "inverse"
