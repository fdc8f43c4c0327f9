"""pipeline.status: status lines on stderr, the result line on stdout, one line each; and
pipeline.collectives.rank_world, the one way a module asks for its rank."""
from types import SimpleNamespace

from pipeline.collectives import is_main_rank, rank_world
from pipeline.status import note, result, say, warn


def test_status_lines_go_to_stderr_and_the_result_to_stdout(capsys):
    say("step 3")
    note("a key was dropped")
    warn("a shard was skipped")
    result("outputs in runs/x/")
    out, err = capsys.readouterr()
    assert err == "[fpdiff] step 3\n[fpdiff] note: a key was dropped\n[fpdiff] warning: a shard was skipped\n"
    assert out == "[fpdiff] outputs in runs/x/\n"


def test_rank_world_from_the_state_else_the_launcher_else_one_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert rank_world() == (0, 1) and is_main_rank()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert rank_world() == (1, 2) and not is_main_rank()  # torchrun's, before any process group exists
    state = SimpleNamespace(process_index=0, num_processes=4)  # an Accelerate state says otherwise: it wins
    assert rank_world(state) == (0, 4) and is_main_rank(state)


def test_an_error_is_one_line_naming_the_command_and_returns_its_exit_code(capsys):
    from pipeline.status import EXIT_BAD_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, fail, interrupted

    assert fail("sample", FileNotFoundError("runs/x: no config.yaml")) == EXIT_BAD_CONFIG == 2
    assert fail("", "config error: training.lr: must be > 0, got 0") == 2
    assert fail("push", "upload to a/b failed: 500", EXIT_FAILED) == 1
    assert interrupted("eval") == EXIT_INTERRUPTED == 130
    out, err = capsys.readouterr()
    assert out == "" and err == ("fpdiff sample: runs/x: no config.yaml\nfpdiff: config error: training.lr: must be > 0, "
                                 "got 0\nfpdiff push: upload to a/b failed: 500\n\nfpdiff eval: interrupted\n")
