"""The `splitserve` command line: generation in-process, errors that name the bad option, and the demo (a real
`splitserve serve` child process driven through the gRPC client)."""
from splitserve.cluster.cli import main


def test_generate_prints_text_and_timing(capsys):
    assert main(["generate", "--local", "--model", "tiny", "--max-tokens", "6", "--ignore-eos", "Hello", "prefill"]) == 0
    out = capsys.readouterr().out
    assert out.count(">>> ") == 2 and out.count("[6 tokens, finish=length, TTFT") == 2


def test_generate_stream(capsys):
    assert main(["generate", "--local", "--model", "tiny", "--stream", "--max-tokens", "5", "--ignore-eos",
                 "Stream"]) == 0
    assert "[5 tokens, finish=length" in capsys.readouterr().out


def test_bad_option_is_reported_with_its_field(capsys):
    assert main(["generate", "--local", "--model", "tiny", "--max-tokens", "0", "x"]) == 2
    assert "max_tokens" in capsys.readouterr().err
    assert main(["generate", "--local", "--model", "nope", "x"]) == 2
    assert "model: 'nope'" in capsys.readouterr().err


def test_demo_serves_streams_and_drains(capsys):
    """The README's first command: the default (real) model answers real questions through a real server."""
    assert main(["demo", "--max-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert out.count(" tokens, finish=") == 3 and "TTFT" in out
    answer = out.split(">>> What is the capital of France?\n", 1)[1].splitlines()[0]
    assert "Paris" in answer
    assert "server drained and stopped (exit code 0)" in out


def test_generate_chat_in_process(capsys):
    assert main(["generate", "--local", "--chat", "--max-tokens", "24", "What is the capital of France?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(">>> What is the capital of France?\n") and "Paris" in out.splitlines()[1]
    assert "finish=stop" in out


def test_chat_session_keeps_the_history(capsys, monkeypatch):
    import io

    lines = "What is the capital of France?\n/reset\nAnd of Italy?\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(["chat", "--local", "--max-tokens", "24"]) == 0
    out = capsys.readouterr()
    replies = [line for line in out.out.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and "Paris" in replies[0] and "(history cleared)" in out.err


def test_fetch_reports_the_model(capsys):
    assert main(["fetch", "smollm2-135m"]) == 0
    assert "LlamaForCausalLM, 30 layers, hidden 576, 9 heads / 3 KV heads" in capsys.readouterr().out
