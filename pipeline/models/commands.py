"""`pipeline train` and `pipeline evaluate`: the model commands, added to the main CLI's subparsers.

Also runnable on their own: `python -m pipeline.models.commands train tlm --steps 100`.
Every failure the user can cause ends in one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError, UserError, one_line

if TYPE_CHECKING:
    from pipeline.models.labels import LabelledSet

DEFAULT_STEPS = {"tlm": 3000, "sslm": 150}
DEFAULT_BATCH = {"tlm": 2, "sslm": 8}


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train` and `evaluate` to the CLI's subparsers."""
    train = subparsers.add_parser(
        "train", help="train a model on synthetic frames, or fine-tune it on labelled frames (--labels)",
        description="Train the TLM (Mask R-CNN) or the SSLM on synthetic frames, resumable; "
        "writes losses.jsonl, checkpoint.pt and the final safetensors weights with their model card.",
    )
    train.add_argument("model", choices=["tlm", "sslm"], help="which model to train")
    train.add_argument("--steps", type=_positive_int, default=None,
                       help=f"optimiser steps in total (default: tlm {DEFAULT_STEPS['tlm']}, sslm {DEFAULT_STEPS['sslm']})")
    train.add_argument("--batch-size", type=_positive_int, default=None,
                       help=f"frames per step (default: tlm {DEFAULT_BATCH['tlm']}, sslm {DEFAULT_BATCH['sslm']})")
    train.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of torch (default 0)")
    train.add_argument("--out", type=Path, default=None, help="run directory (default runs/<model>)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint.pt")
    train.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    train.add_argument("--backbone", default="resnet18_fpn", choices=["resnet18_fpn", "resnet50_fpn"],
                       help="TLM backbone (default resnet18_fpn)")
    train.add_argument("--input", dest="input_transform", default="significance", choices=["significance", "log"],
                       help="SSLM input: counts above the local background in noise units (default), or "
                       "DiPID's log counts")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: tlm 5e-4 AdamW, sslm 0.1 SGD)")
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    train.add_argument("--weights-out", type=Path, default=None,
                       help="where to write the final weights (default <out>/<model>.safetensors)")
    train.add_argument("--stop-after", type=_positive_int, default=None,
                       help="stop at this step with a checkpoint, to be finished later with --resume")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    labelled = train.add_argument_group("labelled frames (fine-tuning; see 'Training on your own labelled frames' in docs/models.md)")
    labelled.add_argument("--labels", type=Path, default=None, metavar="CSV",
                          help="a DiPID/Zooniverse classification export: fine-tune on these labelled frames")
    labelled.add_argument("--scan-dir", type=Path, default=None, metavar="DIR", help="where the labelled scans' .nxs files are")
    labelled.add_argument("--init", type=Path, default=None, metavar="WEIGHTS",
                          help="weights to start from (default: the shipped ones; a DiPID checkpoint works too)")
    labelled.add_argument("--synthetic-fraction", type=float, default=0.0, metavar="F",
                          help="fraction of each batch drawn from synthetic frames (default 0)")
    labelled.add_argument("--hold-out", type=float, default=0.25, metavar="F",
                          help="fraction of the scans held out for validation, whole scans only (default 0.25)")
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="evaluate the models on a held-out synthetic set",
        description="Mean IoU, instance precision/recall/F1 and 3D peak recall of TLM, SSLM, their union "
        "and a classical threshold baseline, on held-out synthetic frames and rocking scans made with "
        "another seed and other generator settings than training; then, on real crowded Pilatus frames "
        "(no outlines), detections, frames at the TLM's cap and the share of a classical spot finder's spots covered.",
    )
    evaluate.add_argument("--frames", type=_positive_int, default=200, help="held-out single frames (default 200)")
    evaluate.add_argument("--scans", type=int, default=4, help="held-out rocking scans for 3D recall (default 4)")
    evaluate.add_argument("--scan-frames", type=_positive_int, default=30, help="frames per scan (default 30)")
    evaluate.add_argument("--seed", type=int, default=12345, help="seed of the held-out set (default 12345)")
    evaluate.add_argument("--config", type=Path, default=None, help="pipeline config whose models section is used")
    evaluate.add_argument("--tlm", type=Path, default=None, help="TLM weights (overrides the config)")
    evaluate.add_argument("--sslm", type=Path, default=None, help="SSLM weights (overrides the config)")
    evaluate.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default cpu)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=4, help="frames per batch (default 4)")
    evaluate.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default=None,
                          help="run the models in this precision (default: models.precision of the config)")
    evaluate.add_argument("--real-frames", default=None, metavar="NPZ",
                          help="real frames without outlines to count detections, cap hits and reference spots on: an .npz "
                               "with a (N, H, W) 'frames' array (default: the 8 shipped Pilatus modules of a thaumatin "
                               "crystal; 'none' to skip)")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    evaluate.add_argument("--labels", type=Path, default=None, metavar="CSV",
                          help="evaluate on these labelled frames (a DiPID/Zooniverse export) instead of the synthetic held-out set")
    evaluate.add_argument("--scan-dir", type=Path, default=None, metavar="DIR", help="where the labelled scans' .nxs files are")
    evaluate.set_defaults(func=run_evaluate)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fail(args: argparse.Namespace, message: str) -> int:
    """One line on stderr, as the main CLI prints its errors; exit code 2."""
    print(f"pipeline {getattr(args, 'command', None) or 'models'}: {message}", file=sys.stderr)
    return 2


def run_train(args: argparse.Namespace) -> int:
    """`pipeline train tlm|sslm ...`"""
    import torch

    from pipeline.models import train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs") / args.model
    steps = args.steps or DEFAULT_STEPS[args.model]
    batch = args.batch_size or DEFAULT_BATCH[args.model]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return _fail(args, f"--device {args.device}: CUDA is not available here")
    if args.resume and not (out / train.CHECKPOINT_NAME).exists():
        return _fail(args, f"--resume: no checkpoint at {out / train.CHECKPOINT_NAME}")
    command = "pipeline " + " ".join(sys.argv[1:]) if sys.argv else ""
    if args.labels is not None:
        return _finetune(args, out, command)
    try:
        if args.model == "tlm":
            weights = train.train_tlm(
                out, steps=steps, batch_size=batch, seed=args.seed, lr=args.lr or 5e-4, device=args.device,
                backbone=args.backbone, resume=args.resume, weights_out=args.weights_out,
                progress=not args.no_progress, command=command, stop_after=args.stop_after,
            )
        else:
            weights = train.train_sslm(
                out, steps=steps, batch_size=batch, seed=args.seed, lr=args.lr or 0.1, device=args.device,
                resume=args.resume, weights_out=args.weights_out, progress=not args.no_progress, command=command,
                stop_after=args.stop_after, input_transform=args.input_transform,
            )
    except (OSError, ValueError) as error:
        return _fail(args, str(error).splitlines()[0] if str(error) else type(error).__name__)
    if weights is None:
        print(f"stopped at step {args.stop_after}; continue with --resume --out {out}")
    else:
        print(f"weights written to {weights}")
    return 0


def _labelled_set(args: argparse.Namespace) -> LabelledSet:
    """The labelled frames `--labels` and `--scan-dir` name, with one line per image that could not be paired."""
    from pipeline.models.labels import load_labelled_frames

    if args.scan_dir is None:
        raise UserError("--labels needs --scan-dir DIR (where the labelled scans' .nxs files are)")
    if not args.scan_dir.is_dir():
        raise UserError(f"--scan-dir {args.scan_dir}: not a directory")
    labelled = load_labelled_frames(args.labels, args.scan_dir)
    for line in labelled.unpaired:
        print(f"not paired: {line}", file=sys.stderr)
    print(f"{args.labels.name}: {labelled.classifications} classifications of {labelled.images} images, "
          f"{len(labelled.frames)} frames paired with scans in {args.scan_dir}")
    return labelled


def _finetune(args: argparse.Namespace, out: Path, command: str) -> int:
    """`pipeline train tlm|sslm --labels CSV --scan-dir DIR`: fine-tuning on labelled frames."""
    from pipeline.models import finetune

    if not 0 <= args.synthetic_fraction <= 1 or not 0 <= args.hold_out < 1:
        return _fail(args, "--synthetic-fraction must be in 0..1 and --hold-out in 0..1 (exclusive)")
    try:
        labelled = _labelled_set(args)
        run = finetune.finetune_tlm if args.model == "tlm" else finetune.finetune_sslm
        options = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
        weights = run(out, labelled, seed=args.seed, device=args.device, init=args.init, synthetic_fraction=args.synthetic_fraction,
                      hold_out=args.hold_out, resume=args.resume, weights_out=args.weights_out, progress=not args.no_progress,
                      command=command, stop_after=args.stop_after, **{k: v for k, v in options.items() if v is not None})
    except PipelineError as error:
        return _fail(args, one_line(error))
    except (OSError, ValueError) as error:
        return _fail(args, one_line(error))
    if weights is None:
        print(f"stopped at step {args.stop_after}; continue with --resume --out {out}")
    else:
        print(f"weights written to {weights}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """`pipeline evaluate ...`"""
    from pipeline.models import evaluate

    try:
        settings = evaluate.model_settings(args.config, args.tlm, args.sslm, args.precision)
        real_frames = None if args.real_frames == "none" else Path(args.real_frames or evaluate.REAL_MODULES)
        if real_frames is not None:
            evaluate.load_frames(real_frames)  # a bad file fails now, not after the held-out set
        if args.labels is not None:
            report = evaluate.evaluate_labelled(settings, _labelled_set(args), device=args.device, batch_size=args.batch_size,
                                                real_frames=real_frames)
        else:
            report = evaluate.evaluate(
                settings, frames=args.frames, scans=args.scans, scan_frames=args.scan_frames, seed=args.seed,
                device=args.device, batch_size=args.batch_size, real_frames=real_frames,
            )
    except PipelineError as error:
        return _fail(args, one_line(error))
    except ValueError as error:  # ConfigError and WeightsError are ValueErrors with one-line messages
        return _fail(args, str(error))
    print(evaluate.format_report(report))
    if args.json:
        evaluate.write_json(report, args.json)
        print(f"figures written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.models.commands")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
