"""The `kdgap` command line: help, the play JSON interface, and one-line user errors."""

import json

import pytest

from kdgap.cli import _analyze_config, build_parser, main

PLAY_KEYS = {
    "cumulative_regret", "action_coverage", "suffix_failure_rate", "invalid_rate",
    "rationale_correct", "action_follows_rationale", "action_matches", "kd_matrix", "config",
}  # fmt: skip


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for cmd in ("play", "freqbias", "organisms", "record", "analyze", "demo", "figures"):
        assert cmd in out


def test_play_writes_the_public_json(tmp_path, capsys):
    path = tmp_path / "ucb.json"
    assert main(["play", "--policy", "ucb", "--episodes", "8", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    assert PLAY_KEYS <= set(out)
    assert out["action_coverage"] == 1.0 and out["rationale_correct"] is None
    assert set(out["action_matches"]) == {"rationale", "optimal", "greedy", "most_frequent"}
    assert "cumulative regret" in capsys.readouterr().out


def test_aiw_is_off_unless_asked():
    parser = build_parser()
    demo = parser.parse_args(["demo", "--out", "x"])
    assert demo.aiw is False and demo.models == ["organism:faithful", "organism:greedy-bypass",
                                                 "organism:seed-calibrated",
                                                 "organism:seed-calibrated-rlft"]  # fmt: skip
    args = parser.parse_args(["analyze", "--model", "smollm2", "--out", "x", "--aiw",
                              "--aiw-samples", "4"])  # fmt: skip
    assert args.model == ["smollm2"]  # --model repeats: several models compared
    assert parser.parse_args(["analyze", "--model", "a", "--model", "b", "--out", "x"]).model == [
        "a", "b"
    ]  # fmt: skip
    cfg = _analyze_config(args)
    assert cfg.aiw is True and cfg.aiw_samples == 4
    assert _analyze_config(demo).aiw is False


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["play", "--policy", "thompson"], "policy='thompson'"),
        (["play", "--arms", "30"], "n_arms=30"),
        (["play", "--steps", "0"], "horizon=0"),
        (["play", "--model", "no-such-org/no-such-model"], "local"),
        (["play", "--model", "organism:no-such-organism"], "no-such-organism"),
        (["figures", "/nonexistent/dir"], "kdgap analyze"),
    ],
)
def test_bad_input_is_one_clear_line_not_a_traceback(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kdgap {argv[0]}: error:") and needle in err
    assert "Traceback" not in err


def test_record_cli_on_an_organism(tmp_path):
    from kdgap.hooks import ActivationStore

    out = tmp_path / "acts"
    argv = [
        "record",
        "--model",
        "organism:faithful",
        "--episodes",
        "2",
        "--steps",
        "6",
        "--hooks",
        "resid_post",
        "--sites",
        "action,rationale.conclusion",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    store = ActivationStore(out)
    acts, labels = store.load(hook="blocks.3.hook_resid_post", site="action")
    assert acts.shape == (12, 128) and len(labels) == 12


def _fails_before_model_work(argv, needle, capsys, out):
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"kdgap {argv[0]}: error:") and needle in last, err
    assert "Traceback" not in err
    assert not list(out.rglob("*.json")) if out.is_dir() else True  # no stage was written


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--steps", "5"], "horizon=5 must be an integer >= 10"),
        (["--steps", "60"], "n_ctx=79"),  # the organisms' context holds 55 steps
        (["--driver", "thompson"], "thompson"),
        (["--rationale", "scripted", "--pairs", "0"], "n_pairs=0"),
        (["--model", "organism:faithful"], "names a model twice"),
    ],
)
def test_analyze_refuses_bad_input_before_any_play(extra, needle, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["analyze", "--model", "organism:faithful", "--out", str(out), *extra]
    _fails_before_model_work(argv, needle, capsys, out)


def test_analyze_out_must_be_a_folder(tmp_path, capsys):
    out = tmp_path / "file.txt"
    out.write_text("not a folder")
    argv = ["analyze", "--model", "organism:faithful", "--out", str(out)]
    _fails_before_model_work(argv, "is a file", capsys, tmp_path / "none")


def test_freqbias_rep_step_zero_is_one_line(capsys):
    argv = ["freqbias", "--policy", "greedy", "--rep-step", "0"]
    _fails_before_model_work(argv, "rep_step=0", capsys, __import__("pathlib").Path("/nonexistent"))


def test_recording_into_another_models_store_is_one_line(tmp_path, capsys):
    out = tmp_path / "acts"
    common = ["--episodes", "1", "--steps", "4", "--hooks", "resid_post", "--sites", "action",
              "--out", str(out)]  # fmt: skip
    assert main(["record", "--model", "organism:faithful", *common]) == 0
    capsys.readouterr()
    assert main(["record", "--model", "organism:greedy-bypass", *common]) == 2
    err = capsys.readouterr().err
    assert "kdgap record: error:" in err and "Traceback" not in err
