"""User mistakes: one clear line on stderr, exit code 2, nothing written."""

import json

import pytest
from twinbench.harness.cli.main import main


@pytest.mark.parametrize("argv,needle", [
    (["run", "nosuchsuite", "--device", "cpu"], "unknown suite 'nosuchsuite'"),
    (["run", "attention", "--device", "cpu", "--impl", "nosuchimpl"], "unknown impl nosuchimpl"),
    (["run", "attention", "--device", "cpu", "--case", "batch"], "malformed --case"),
    (["run", "attention", "--device", "cpu", "--case", "batch=1,,seq_q="], "malformed --case"),
    (["run", "attention", "--device", "cpu", "--case", "colour=red"], "has no parameter colour"),
    (["run", "attention", "--device", "cpu", "--case", "dtype=fp8"], "dtype must be one of fp32, fp16, bf16, got 'fp8'"),
    (["run", "attention", "--device", "tpu:0"], "no device 'tpu:0'"),
    (["run", "attention", "--device", "cpu", "--reference-device", "tpu:0"], "no device 'tpu:0'"),
    (["run", "qlora", "--device", "cpu", "--case", "kind=gpt9"], "kind must be one of llama, qwen3_moe, got 'gpt9'"),
    (["run", "moe_ffn", "--device", "cpu", "--case", "routing=random"], "routing must be one of balanced, skewed, one_expert, got 'random'"),
    (["run", "dpo", "--device", "cpu", "--case", "loss=hinge"], "loss must be one of sigmoid, ipo, robust, got 'hinge'"),
    (["run", "attention", "--device", "cpu", "--profile", "huge"], "has no profile 'huge'"),
    (["run", "attention", "--device", "cpu", "--plugin", "/nonexistent/plugin.py"], "plugin file not found"),
    (["run", "attention", "--device", "cpu", "--rounds", "3"], "argument --rounds: must be >= 7"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    argv = [*argv, "--out", str(tmp_path / "o")] if argv[0] == "run" else argv
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_unreadable_plugin_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("def oops(:\n")
    assert main(["list", "--plugin", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cannot load plugin" in err and "SyntaxError" in err


def test_devices_json_has_fingerprint(capsys):
    assert main(["devices", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    cpu = next(d for d in found if d["device"]["name"] == "cpu")
    hard = cpu["fingerprint"]["hard"]
    for key in ("backend", "device", "arch", "compute_units", "memory_gb", "torch", "triton", "cpu",
                "cpu_threads", "timing_mode", "triton_interpreter"):
        assert key in hard


def test_list_says_why_an_impl_cannot_run(capsys):
    assert main(["list", "attention", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "flash_attn" in out and "CUDA/ROCm only" in out
    assert "sdpa" in out


@pytest.mark.parametrize("error, code, line", [
    ("worker", 1, "twinbench: stopped: gate worker exited with code 3"),
    ("interrupt-run", 130, "twinbench: interrupted (finish with --resume)"),
    ("interrupt-gate", 130, "twinbench: interrupted"),
])
def test_a_dead_worker_or_ctrl_c_is_one_line_not_a_traceback(error, code, line, monkeypatch, capsys):
    """A gate worker that dies (or Ctrl-C) mid-command ends in one line; only `run` offers --resume."""
    from twinbench.harness.cli import main as cli_main
    from twinbench.harness.run.process import WorkerDied

    def handler(args):
        if error == "worker":
            raise WorkerDied("gate worker exited with code 3\nlog tail: ...")
        raise KeyboardInterrupt

    real = cli_main.build_parser

    def parser_with_planted_handler():
        parser = real()
        for action in parser._subparsers._group_actions:
            for sub in action.choices.values():
                sub.set_defaults(handler=handler)  # keeps each command's other defaults (interrupt_hint)
        return parser

    monkeypatch.setattr(cli_main, "build_parser", parser_with_planted_handler)
    argv = ["run", "--device", "cpu"] if error == "interrupt-run" else ["gate", "--against", "HEAD"]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err == line + "\n"
