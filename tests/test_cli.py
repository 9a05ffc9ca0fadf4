"""The `splitserve` command line: generation in-process, errors that name the bad option, and the demo (a real
`splitserve serve` child process driven through the gRPC client)."""
from splitserve.cluster.cli import main


def test_generate_prints_text_and_timing(capsys):
    assert main(["generate", "--local", "--max-tokens", "6", "--ignore-eos", "Hello", "prefill"]) == 0
    out = capsys.readouterr().out
    assert out.count(">>> ") == 2 and out.count("[6 tokens, finish=length, TTFT") == 2


def test_generate_stream(capsys):
    assert main(["generate", "--local", "--stream", "--max-tokens", "5", "--ignore-eos", "Stream"]) == 0
    assert "[5 tokens, finish=length" in capsys.readouterr().out


def test_bad_option_is_reported_with_its_field(capsys):
    assert main(["generate", "--local", "--max-tokens", "0", "x"]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert main(["generate", "--local", "--model", "nope", "x"]) == 2
    assert "model: 'nope'" in capsys.readouterr().err


def test_demo_serves_streams_and_drains(capsys):
    assert main(["demo", "--max-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("[6 tokens, finish=length, TTFT") == 3
    assert "server drained and stopped (exit code 0)" in out
