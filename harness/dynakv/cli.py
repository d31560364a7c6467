"""``kvh dynakv calibrate|train|ranks``: DynaKV's PCA bases from text, its gates by post-training, and the
kept ranks per token of a checkpoint over a text (the paper's section 5.1 figure).

    kvh dynakv calibrate --model smollm2_135m --text ../shared/data/text/gutenberg --tokens 1000000 \\
        --out ckpt/smollm2_135m_pca.safetensors
    kvh dynakv train --model smollm2_135m --init ckpt/smollm2_135m_pca.safetensors \\
        --text ../shared/data/text/gutenberg --tokens 4000000 --alpha 2 --steps 1000 \\
        --eval-text ../shared/data/text/wikitext-2-raw-reconstructed/wiki.test.raw --out ckpt/smollm2_a2.safetensors
    kvh dynakv ranks --model smollm2_135m --checkpoint auto --text wiki.test.raw --out ranks.png

``--model`` is a model config (``conf/model/<name>.yaml``; ``--set model.dtype=bfloat16`` and the like
override its keys). Training logs every step to W&B (offline without an API key; ``--no-wandb`` turns it
off) and writes the checkpoint with its manifest (``harness.dynakv.checkpoint``): the data, tokens, alpha,
steps, and the retain rate and perplexity measured with the saved file on ``--eval-text``. ``--basis train``
trains the bases ``U`` with the gates (from PCA; ``--basis-lr``), and ``--reconstruction`` says how ``U^-1`` is
kept (``inverse``: a free ``U``, ``torch.linalg.inv``; ``transpose``: an orthogonal ``U``, ``U^T``); both are
recorded, and every later run on the checkpoint reconstructs as it was trained.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from methods import ConfigError
from methods.lowrank import BASIS_CHOICES, RECONSTRUCTIONS

log = logging.getLogger("harness.dynakv")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _model_cfg(args):
    """The composed model config of ``--model`` and ``--set`` (ConfigError naming the fix)."""
    from omegaconf import OmegaConf

    from harness import config
    try:
        cfg = config.compose([f"model={args.model}", *args.set])
    except Exception as error:   # Hydra's and OmegaConf's errors name the bad override
        raise ConfigError(f"--model {args.model} {' '.join(args.set)}: {error}; fix: a config in conf/model "
                          f"({config.group_options('model')}) and --set model.<key>=<value>") from None
    return OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))


def _load(args, model_cfg=None):
    from harness.engine.models import load_model
    model_cfg = model_cfg if model_cfg is not None else _model_cfg(args)
    return model_cfg, load_model(model_cfg)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a model config name (conf/model/<name>.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                        help="override a key of the model config (repeatable)")


def _record(args, model_cfg, lm) -> dict:
    from harness.dynakv.checkpoint import package_file_hashes
    from harness.engine.models import model_identity
    identity = model_identity(model_cfg)
    if identity["weights"].get("source") == "package":   # so that the same file loaded as a .gguf matches
        identity["weights"]["files_sha256"] = package_file_hashes(model_cfg)
    return {"model": {"name": model_cfg.name, "name_or_path": model_cfg.get("name_or_path") or model_cfg.get("path")
                      or model_cfg.get("package"), "identity": identity},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "kvh dynakv " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["dynakv"] else sys.argv[1:]),
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}


def cmd_calibrate(args) -> None:
    from harness.dynakv import checkpoint, data, train
    data.text_files(args.text)          # before the model loads
    model_cfg, lm = _load(args)
    windows, record = data.token_windows(lm.tokenizer, args.text, args.tokens, args.seq_len)
    start = time.perf_counter()
    bases = train.calibrate(lm.model, windows, args.batch_size, args.centred)
    seconds = round(time.perf_counter() - start, 1)
    probe = windows[: min(8, windows.shape[0])]
    rates = {str(eta): rate for eta, rate in train.energy_rates(lm.model, bases, probe, batch_size=args.batch_size).items()}
    manifest = {**_record(args, model_cfg, lm), "centred": args.centred, "calibration": record, "seconds": seconds,
                "energy_rate_by_eta": rates, "energy_rate_tokens": int(probe.numel())}
    path = checkpoint.save(args.out, bases, manifest, dtype=DTYPES[args.dtype])
    print(json.dumps({"checkpoint": str(path), "layers": len(bases), "tokens": record["tokens"],
                      "energy_rate_by_eta": rates}))


def cmd_train(args) -> None:
    from harness.dynakv import checkpoint, data, train
    data.text_files(args.text)
    if args.eval_text:
        data.text_files([args.eval_text])
    if args.alpha < 0:
        raise ConfigError(f"--alpha {args.alpha} must be >= 0 (the weight of R^2; larger gives lower rates)")
    if not args.lr > 0:
        raise ConfigError(f"--lr {args.lr} must be > 0; fix: e.g. --lr 3e-3")
    basis_lr = args.lr if args.basis_lr is None else args.basis_lr
    if not basis_lr > 0:
        raise ConfigError(f"--basis-lr {args.basis_lr} must be > 0 (the learning rate of U with --basis train); fix: "
                          "e.g. --basis-lr 1e-4, or leave it out (the same as --lr)")
    if not 0 <= args.tau < 1:
        raise ConfigError(f"--tau {args.tau} must be in [0, 1) (the inference mask threshold); fix: e.g. --tau 0.1")
    try:
        init = checkpoint.resolve(args.init, args.model)
    except ConfigError as error:
        raise ConfigError(str(error).replace("method.transform_checkpoint", "--init")) from None
    bases, _, init_manifest = checkpoint.load(init)
    _check_init_basis(init, init_manifest, args.reconstruction)
    checkpoint.check_model(init, init_manifest, _model_cfg(args))     # before the weights load
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.fsdp and not distributed:
        raise ConfigError("--fsdp shards the backbone over torchrun ranks, and this is one process; fix: torchrun "
                          "--nproc-per-node N -m harness dynakv train ... --fsdp, or leave --fsdp out")
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            args.set = [*args.set, f"model.device=cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"]
    rank = torch.distributed.get_rank() if distributed else 0
    model_cfg, lm = _load(args)
    device = next(lm.model.parameters()).device
    if args.fsdp:
        log.info("FSDP: %d decoder layers sharded over %d ranks", train.shard_backbone(lm.model),
                 torch.distributed.get_world_size())
    windows, record = data.token_windows(lm.tokenizer, args.text, args.tokens, args.seq_len)
    transforms = train.fresh_transforms(bases, args.tau, device, args.reconstruction)
    run = _wandb(args, model_cfg) if rank == 0 and args.wandb else None
    start = time.perf_counter()

    def on_step(step):
        if run is not None:
            run.log({k: v for k, v in step.items() if k != "step"}, step=step["step"])
        if rank == 0 and (step["step"] % max(1, args.steps // 20) == 0 or step["step"] == args.steps - 1):
            log.info("step %d: ce %.4f, soft rate %.4f, loss %.4f", step["step"], step["ce"], step["rate"], step["loss"])

    history = train.train(lm.model, transforms, windows, args.alpha, args.steps, args.batch_size, args.lr,
                          args.checkpointing, args.seed, on_step, args.basis, basis_lr)
    if rank != 0 and not args.fsdp:
        torch.distributed.destroy_process_group()
        return
    if rank != 0:      # a sharded model's forward needs every rank: measure with rank 0 on the saved file
        if args.eval_text:
            torch.distributed.barrier()
            saved = checkpoint.transforms_for({"transform": "dynakv", "transform_tau": args.tau}, lm.model,
                                              Path(args.out))
            eval_windows, _ = data.token_windows(lm.tokenizer, [args.eval_text], args.eval_tokens, args.seq_len)
            train.measure(lm.model, saved, eval_windows, args.batch_size)
        torch.distributed.destroy_process_group()
        return
    gates = {layer: {kind: t.gate for kind, t in pair.items()} for layer, pair in transforms.items()}
    # the bases as training left them: the trained U with --basis train, else the PCA ones unchanged
    final_bases = {layer: {kind: t.basis for kind, t in pair.items()} for layer, pair in transforms.items()}
    trained_basis = args.basis == "train" or init_manifest.get("basis") == "trained"
    manifest = {**_record(args, model_cfg, lm), "centred": bool(init_manifest.get("centred", False)),
                "calibration": init_manifest.get("calibration"), "init": {"file": init.name},
                "training": {**record, "alpha": args.alpha, "steps": args.steps, "batch_size": args.batch_size,
                             "world_size": torch.distributed.get_world_size() if distributed else 1, "lr": args.lr,
                             "optimizer": "AdamW (weight_decay 0, 5% linear warm-up)", "backbone": "frozen",
                             "fsdp": bool(args.fsdp),
                             "basis": "trained (from --init's)" if args.basis == "train" else
                             "frozen (--init's, trained)" if init_manifest.get("basis") == "trained" else "frozen (PCA)",
                             "basis_lr": basis_lr if args.basis == "train" else None,
                             "reconstruction": args.reconstruction, "checkpointing": args.checkpointing,
                             "seed": args.seed, "first": history[0], "last": history[-1],
                             "seconds": round(time.perf_counter() - start, 1)},
                "tau": args.tau, "basis": "trained" if trained_basis else "pca", "reconstruction": args.reconstruction}
    path = checkpoint.save(args.out, final_bases, manifest, gates, dtype=DTYPES[args.dtype])
    if args.eval_text:   # measured with the file as saved (its dtype), as every later run reads it
        if args.fsdp:
            torch.distributed.barrier()      # the other ranks read the file now
        knobs = {"transform": "dynakv", "transform_tau": args.tau}
        saved = checkpoint.transforms_for(knobs, lm.model, path)
        eval_windows, eval_record = data.token_windows(lm.tokenizer, [args.eval_text], args.eval_tokens, args.seq_len)
        measured = train.measure(lm.model, saved, eval_windows, args.batch_size)
        manifest["measured"] = {"text": eval_record, "tau": args.tau, **measured}
        path = checkpoint.save(args.out, final_bases, manifest, gates, dtype=DTYPES[args.dtype])
        if run is not None:
            run.summary.update({f"measured/{k}": v for k, v in measured.items() if isinstance(v, float)})
    if run is not None:
        run.finish()
    if distributed:
        torch.distributed.destroy_process_group()
    print(json.dumps({"checkpoint": str(path), "alpha": args.alpha, "last": history[-1],
                      "measured": {k: v for k, v in manifest.get("measured", {}).items() if isinstance(v, float)}}))


def _check_init_basis(init: Path, manifest: dict, reconstruction: str) -> None:
    """An ``--init`` checkpoint whose basis was trained carries its ``reconstruction``: training on it with another
    is refused (a free ``U`` has no ``U^T`` inverse; an orthogonal one was trained for ``U^T``)."""
    recorded = manifest.get("reconstruction", "inverse")
    if manifest.get("basis") == "trained" and recorded != reconstruction:
        raise ConfigError(f"--init {init} holds a basis trained with reconstruction {recorded!r}, not "
                          f"--reconstruction {reconstruction}; fix: --reconstruction {recorded}, or a calibration "
                          "checkpoint (PCA bases) as --init")


def _wandb(args, model_cfg):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: training is not logged to W&B")
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(project=args.wandb_project, job_type="dynakv-train", mode=mode,
                      name=f"{model_cfg.name}/{Path(args.out).stem}", dir=args.wandb_dir,
                      config={k: v for k, v in vars(args).items() if k != "func"}, tags=[model_cfg.name, "dynakv"])


def cmd_ranks(args) -> None:
    from harness.dynakv import checkpoint, ranks
    path = checkpoint.resolve(args.checkpoint, args.model)
    _, gates, manifest = checkpoint.load(path)
    if not gates:
        raise ConfigError(f"--checkpoint {path} holds only PCA bases; the ranks per token are the trained gate's: fix: "
                          "a checkpoint from `kvh dynakv train`")
    model_cfg = _model_cfg(args)
    checkpoint.check_model(path, manifest, model_cfg)
    model_cfg, lm = _load(args, model_cfg)
    text = Path(args.text).expanduser()
    if not text.is_file():
        raise ConfigError(f"--text {args.text}: not a file")
    from harness.tasks.perplexity import read_text
    summary = ranks.ranks_over_text(lm, path, read_text(str(text)), args.tokens, args.tau, args.bos)
    out = Path(args.out)
    ranks.plot(summary, out, title=f"{model_cfg.name}: kept ranks per token ({path.name}, tau={args.tau})")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"figure": str(out), **{k: v for k, v in summary.items() if k in ("bos", "content", "stopword")}}))


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a bad option or value as one ``error:`` line with exit code 2 (as every ``kvh`` user
    error is), without the usage block; ``--help`` shows the usage."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvh dynakv", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("table", help="DynaKV and its baselines in one table per model (kvh dynakv table --help)",
                   add_help=False)
    c = sub.add_parser("calibrate", help="PCA bases of every layer's K and V from text",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(c)
    c.add_argument("--text", nargs="+", required=True, help="text files or folders (.txt, .raw, .txt.gz, .jsonl(.gz))")
    c.add_argument("--tokens", type=int, default=1_000_000, help="calibration tokens")
    c.add_argument("--seq-len", type=int, default=1024, help="tokens per window")
    c.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    c.add_argument("--centred", action="store_true", help="PCA of the covariance (the paper subtracts no mean)")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tensor dtype in the file")
    c.add_argument("--out", required=True, help="the .safetensors file to write")
    c.set_defaults(func=cmd_calibrate)
    t = sub.add_parser("train", help="train the gates (CE + alpha R^2), and with --basis train the bases; backbone "
                       "frozen", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(t)
    t.add_argument("--init", required=True, help="a calibration checkpoint (its bases), or auto")
    t.add_argument("--text", nargs="+", required=True, help="training text files or folders")
    t.add_argument("--tokens", type=int, default=4_000_000, help="training tokens (windows cycled)")
    t.add_argument("--seq-len", type=int, default=1024, help="tokens per training window")
    t.add_argument("--alpha", type=float, required=True, help="weight of R^2; larger gives a lower retain rate")
    t.add_argument("--steps", type=int, default=500, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=8, help="windows per step (per rank)")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the gates (constant after warm-up)")
    t.add_argument("--basis", choices=BASIS_CHOICES, default="frozen",
                   help="frozen: keep the PCA bases U; train: train every layer's K and V U with the gates, from PCA "
                   "(the paper)")
    t.add_argument("--basis-lr", type=float, default=None,
                   help="AdamW learning rate of U with --basis train, warmed up as --lr is; None: --lr's value")
    t.add_argument("--reconstruction", choices=RECONSTRUCTIONS, default="inverse",
                   help="how U^-1 is kept, in training and in every run on the checkpoint: inverse (a free U, "
                   "torch.linalg.inv(U) in float32 each step) or transpose (U kept orthogonal, U^-1 = U^T)")
    t.add_argument("--tau", type=float, default=0.1, help="inference mask threshold (recorded, used for --eval-text)")
    t.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    t.add_argument("--fsdp", action="store_true", help="shard the frozen backbone over the torchrun ranks (FSDP2): "
                   "each GPU holds 1/N of the weights (an 8B model on smaller GPUs); needs torchrun")
    t.add_argument("--seed", type=int, default=0, help="seed of the window order")
    t.add_argument("--eval-text", help="text to measure the saved checkpoint's retain rate and perplexity on")
    t.add_argument("--eval-tokens", type=int, default=65536)
    t.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tensor dtype in the file")
    t.add_argument("--out", required=True, help="the .safetensors file to write (its manifest goes beside it as .json)")
    t.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                   help="log steps to W&B (offline without WANDB_API_KEY)")
    t.add_argument("--wandb-project", default="kv-harness")
    t.add_argument("--wandb-dir", default=None)
    t.set_defaults(func=cmd_train)
    r = sub.add_parser("ranks", help="kept ranks per token over a text, with a figure",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(r)
    r.add_argument("--checkpoint", default="auto", help="a trained checkpoint, or auto (the shipped one)")
    r.add_argument("--text", required=True, help="a text file")
    r.add_argument("--tokens", type=int, default=1024, help="tokens measured (the text's first; the figure shows "
                   "the first 48)")
    r.add_argument("--tau", type=float, default=0.1, help="the mask threshold")
    r.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="put the tokenizer's BOS first (default: as the tokenizer does)")
    r.add_argument("--out", required=True, help="the figure (.png); its numbers go beside it as .json")
    r.set_defaults(func=cmd_ranks)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        from harness.dynakv import table
        return table.main(argv[1:])
    args = parser().parse_args(argv)
    for key in ("tokens", "seq_len", "batch_size", "steps", "eval_tokens"):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{key.replace('_', '-')} {value} must be >= 1")
    args.func(args)
