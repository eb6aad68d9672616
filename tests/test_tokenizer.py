"""Tokenizer against tiktoken built directly from the files, plus the streaming decoder."""
import base64
import json
import os
import random
import time

import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from k2lite.tokenizer import PAT_STR, Tokenizer

TOK_DIR = os.path.join(os.path.dirname(__file__), "..", "models", "kimi-k2-thinking")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TOK_DIR)


@pytest.fixture(scope="module")
def oracle():
    """tiktoken built straight from the files, without k2lite's loader."""
    ranks = load_tiktoken_bpe(os.path.join(TOK_DIR, "tiktoken.model"))
    with open(os.path.join(TOK_DIR, "tokenizer_config.json")) as f:
        named = {int(k): v["content"] for k, v in json.load(f)["added_tokens_decoder"].items()}
    n = len(ranks)
    specials = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(n, n + 256)}
    return tiktoken.Encoding("oracle", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def random_text(rng):
    """Mixed scripts, emoji, code, markup and long whitespace runs."""
    pieces = ["Hello", " world", "'s", "I'LL", "你好世界", "中文分词", "😀", "👩‍💻", "🇫🇷", "é", "e\u0301",
              "def f(x):\n    return x**2\n", "\t", "\r\n", "  ", " " * rng.randint(1, 40),
              "\n" * rng.randint(1, 5), "12345678", "３．１４", "Ωμέγα", "Привет", "مرحبا",
              "<|im_end|>", "<think>", "</think>", "<|tool_call_begin|>", "{\"a\": [1, 2]}", "\u00a0",
              "\u3000", "ﾊﾝｶｸ", "x", "!!", "...", "—", "\x00", "\ufeff"]
    s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
    # Plus arbitrary code points (not surrogates) to reach the corners of the regex.
    s += "".join(chr(rng.choice([rng.randint(32, 0x2FFF), rng.randint(0xE000, 0x1FAFF)]))
                 for _ in range(rng.randint(0, 10)))
    return s


def test_sizes_and_special_ids(tok):
    assert tok.n_ranks == 163584 and tok.vocab_size == 163840
    assert tok.bos_id == tok.special_id("[BOS]") == 163584
    assert tok.eos_ids == [tok.special_id("<|im_end|>"), tok.special_id("[EOS]")] == [163586, 163585]
    assert tok.special_names[163592] == "<|reserved_token_163592|>"
    assert tok.special_id("<|tool_call_begin|>") == 163597
    assert tok.encode("<think>") == [tok.special_id("<think>")]  # named in this config


def test_known_encodings(tok):
    assert tok.encode("Hello, world! This is a test.") == [19180, 11, 2695, 0, 1379, 387, 261, 1812, 13]
    assert tok.encode("你好，世界！") == [33845, 378, 2243, 856]


def test_regex_needs_v1():
    """`&&` is class intersection: V1 keeps "Hello", V0 silently drops letters (llama.cpp #14642)."""
    assert regex.findall(PAT_STR, "Hello World's", flags=regex.V1) == ["Hello", " World's"]
    assert regex.findall(PAT_STR, "Hello World's", flags=regex.V0) != ["Hello", " World's"]


def test_encode_matches_tiktoken_and_round_trips(tok, oracle):
    rng = random.Random(0)
    for _ in range(300):
        s = random_text(rng)
        ids = tok.encode(s)
        assert ids == oracle.encode(s, allowed_special="all"), repr(s)
        assert tok.decode(ids) == s, repr(s)
        assert tok.encode_ordinary(s) == oracle.encode_ordinary(s), repr(s)


def test_special_strings_become_special_ids(tok):
    ids = tok.encode("a<|im_end|>b")
    assert tok.special_id("<|im_end|>") in ids
    plain = tok.encode_ordinary("a<|im_end|>b")
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(plain) == "a<|im_end|>b"


def test_long_whitespace_runs_are_cut_like_the_release(tok, oracle):
    """Runs over 25,000 chars are cut before BPE, exactly where the released tokenizer cuts them."""
    s = "x" + " " * 30000 + "y" + "a" * 26000
    cut = ["x" + " " * 25000, " " * 5000 + "y" + "a" * 24999, "a" * 1001]
    assert tok.encode(s) == [i for piece in cut for i in oracle.encode(piece)]
    assert tok.decode(tok.encode(s)) == s


def test_decode_specials_and_bad_ids(tok):
    assert tok.decode([tok.special_id("<|im_end|>")]) == "<|im_end|>"
    assert tok.decode([163700]) == "<|reserved_token_163700|>"
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


def test_stream_decoder_never_emits_half_a_character(tok):
    text = "naïve 你好 😀👩‍💻 done"
    ids = tok.encode(text)
    # Split each multibyte char's bytes over several ids by using single-byte tokens.
    byte_ids = [tok.enc.encode_single_token(bytes([b])) for b in text.encode("utf-8")]
    for seq in (ids, byte_ids):
        dec = tok.stream_decoder()
        pieces = [dec.feed(i) for i in seq] + [dec.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)
    dec = tok.stream_decoder()
    assert dec.feed(byte_ids[text.encode().index("你".encode())]) == ""  # first byte of 你 only
    assert dec.flush() == "\ufffd"


def test_small_prefix_vocabulary(tmp_path):
    """A demo model ships a prefix of the ranks; specials follow it, looked up by name."""
    src = os.path.join(TOK_DIR, "tiktoken.model")
    with open(src, "rb") as f:
        lines = [next(f) for _ in range(8000)]
    (tmp_path / "tiktoken.model").write_bytes(b"".join(lines))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "8000": {"content": "[BOS]"}, "8002": {"content": "<|im_end|>"},
        "8010": {"content": "<|im_middle|>"}}}))
    t = Tokenizer.from_dir(str(tmp_path))
    assert (t.vocab_size, t.bos_id, t.eos_ids) == (8256, 8000, [8002])
    assert t.special_names[8001] == "<|reserved_token_8001|>"
    s = "Hello wörld 你好 😀"
    assert t.decode(t.encode(s)) == s
    assert t.encode("hi<|im_end|>")[-1] == 8002
    assert base64.b64decode(lines[0].split()[0]) == t.token_bytes(0)


def test_bad_added_token_id(tmp_path):
    src = os.path.join(TOK_DIR, "tiktoken.model")
    with open(src, "rb") as f:
        (tmp_path / "tiktoken.model").write_bytes(b"".join(next(f) for _ in range(300)))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"163586": {"content": "<|im_end|>"}}}))
    with pytest.raises(ValueError, match="outside the special range"):
        Tokenizer.from_dir(str(tmp_path))


def test_every_id_decodes_alone_and_streamed(tok):
    ids = range(tok.vocab_size)
    assert all(tok.decode([i]) == tok.token_bytes(i).decode("utf-8", "replace") for i in ids)
    dec = tok.stream_decoder()
    streamed = "".join(dec.feed(i) for i in ids) + dec.flush()
    assert streamed == tok.decode(ids) == tok.decode(iter(ids))  # any iterable, read once


@pytest.mark.parametrize("bad", [-1, 163840, 10 ** 12])
def test_out_of_range_ids_raise_value_error_everywhere(tok, bad):
    for f in (lambda: tok.decode([bad]), lambda: tok.token_bytes(bad),
              lambda: tok.stream_decoder().feed(bad)):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            f()


@pytest.mark.parametrize("text, same_as", [
    ("\ud800", "\ufffd"),                        # a lone surrogate becomes U+FFFD (tiktoken's rule)
    ("a\udfffb", "a\ufffdb"),
    ("\ud83d\ude00", "😀"),                      # a surrogate pair is the character it encodes
])
def test_surrogates_encode_like_the_release(tok, oracle, text, same_as):
    assert tok.encode(text) == tok.encode(same_as) == oracle.encode(text, allowed_special="all")
    assert tok.encode_ordinary(text) == tok.encode_ordinary(same_as)


@pytest.mark.parametrize("run", ["a", " ", "1", "\u3000"])
def test_long_run_check_is_linear(tok, run):
    """Runs just under the 25,000-char cut must not make encode quadratic (it took ~9 s here)."""
    text = (run * 24_999 + ("x" if run.isspace() else " ")) * 16
    t = time.perf_counter()
    ids = tok.encode(text)
    assert time.perf_counter() - t < 2.0
    assert tok.decode(ids) == text


SCRIPTS = ["", "English: it's, they'LL, we'd", "中文：你好，世界！", "日本語のテキストとカタカナ", "한국어 문장",
           "مرحبا بالعالم", "עִבְרִית", "\u202eRTL override\u202c", "हिन्दी देवनागरी", "ไทย", "ქართული",
           "Ελληνικά", "Русский", "👨‍👩‍👧‍👦 👍🏽 🏳️‍🌈 🇯🇵", "e\u0301 Z̷̢a̸l̵g̶o", "\t\tx\r\n\r\n  \n", " " * 7,
           "1234567890123 ３．１４ ١٢٣ 𝟙𝟚𝟛", "x" * 5000, "\x00\x7f\ufeff\u200b\u00a0\u3000"]


@pytest.mark.parametrize("text", SCRIPTS)
def test_scripts_whitespace_and_numbers(tok, oracle, text):
    ids = tok.encode(text)
    assert ids == oracle.encode(text, allowed_special="all") == tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    dec = tok.stream_decoder()
    assert "".join(dec.feed(i) for i in ids) + dec.flush() == text


def test_long_text_round_trip_across_the_400k_chunk_cut(tok, oracle):
    """A novel-length text of words, numbers, punctuation and newlines, with a word straddling
    the cut: the released tokenizer cuts at 400k characters and so do we."""
    rng = random.Random(7)
    words = ["the", "Elizabeth", "said", "ﬁne", "naïve", "1813", "—", "«quoi»", "don't", "中文", ",", ".", "\n\n"]
    text = " ".join(rng.choice(words) for _ in range(90_000))
    text = text[:399_996] + "Darcy was" + text[399_996:]
    assert len(text) > 400_000
    ids = tok.encode(text)
    assert ids == oracle.encode(text[:400_000]) + oracle.encode(text[400_000:])
    assert tok.decode(ids) == text
