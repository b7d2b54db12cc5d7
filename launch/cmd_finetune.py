"""Fine-tune a (compressed) model, with labels or by distillation from the original.

With --teacher the student learns the teacher's predictions (soft labels
sigmoid(teacher_logit / T)) and the data's labels are not used: compressed models can be
recovered on unlabelled traffic.

Writes a new model folder OUT; the input model is never modified. The starting model is
scored on the validation rows first (--no-eval-at-start skips it), so it is kept, and the
log says so, when no step beats it; otherwise the log names the step kept and its gain.

Example:
  afmrec finetune --model runs/demo/afm --data runs/demo/data/train --epochs 1 --out runs/demo/afm_ft
  afmrec finetune --model runs/demo/afm --teacher runs/demo/original --data ... --out runs/demo/afm_distill
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_data, add_distributed, add_output, job, print_throughput
from .train_options import add_train_options, train_config, validation_split

HELP = "fine-tune a compressed model with labels or by distillation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the model folder to start from")
    parser.add_argument("--teacher", type=Path, help="distil from this model's logits instead of labels")
    add_data(parser, what="training data")
    add_output(parser, "the fine-tuned model folder")
    add_train_options(parser, finetune=True)
    add_distributed(parser)


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.stages import finetune_stage

    train, val = validation_split(args)
    with job(args) as (env, sharding):
        finetune_stage(args.model, args.out, train, val, train_config(args), env=env,
                       sharding=sharding, teacher_dir=args.teacher, batch_size=args.batch_size,
                       overwrite=args.overwrite, progress=not args.quiet)
        if env.rank == 0:
            print(f"model written to {args.out}")
            if not args.quiet:
                print_throughput(args.out)
    return 0
