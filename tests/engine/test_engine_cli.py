"""`switchyard engine serve` bad input: one line, exit code 2, before any weights load."""

from __future__ import annotations

from training.cli import main


def test_unknown_model_is_one_line(capsys):
    assert main(["engine", "serve", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("switchyard: error: unknown model") and "\n" not in err


def test_missing_chat_template_file(capsys, tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    assert main(["engine", "serve", "--model", folder, "--chat-template", "/nope.jinja"]) == 2
    assert "--chat-template" in capsys.readouterr().err


def test_bad_engine_option(capsys, tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    assert main(["engine", "serve", "--model", folder, "--block-size", "0"]) == 2
    assert "block_size" in capsys.readouterr().err
