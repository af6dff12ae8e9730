"""Tests of the text-side mitigation tools (paper, Section 4.2 and Appendix D.4): token choice
from attributions, BPE-token-to-word alignment, the offline and chat rephrasers, the safe
``rephrase`` wrapper and the RTA baseline. No network: the chat adapter talks to a local stub."""

from __future__ import annotations

import http.server
import json
import math
import re
import threading
import time

import jax
import numpy as np
import pytest

from mmh_jax.memorization.rephrase import (
    ChatRephraser,
    RephraseOutcome,
    SynonymRephraser,
    chat_instruction,
    choose_tokens,
    clip_vocabulary_words,
    load_synonyms,
    random_token_addition,
    rephrase,
    selected_words,
    token_probabilities,
    uniform_tokens,
)

KEY = jax.random.key(0)


def _keys(n: int, seed: int = 0):
    # one key per seed: slicing a split key array costs milliseconds per key on CPU
    return [jax.random.key(seed * 100_003 + i) for i in range(n)]


def _within(freq: np.ndarray, p: np.ndarray, n: int, sigmas: float = 4.5) -> bool:
    """Empirical frequencies from n draws agree with p entrywise within `sigmas` std errors."""
    se = np.sqrt(p * (1 - p) / n)
    return bool(np.all(np.abs(freq - p) <= sigmas * se + 1e-12))


# ------------------------------------------------------------------------------------------
# token_probabilities / choose_tokens / uniform_tokens
# ------------------------------------------------------------------------------------------


def test_token_probabilities_is_smoothed_softmax_of_raw_attributions():
    a = [0.3, 0.1, 0.0]
    e = [math.exp(3.0), math.exp(1.0), math.exp(0.0)]
    soft = [x / sum(e) for x in e]
    smooth = [(x + 1e-3) / (1 + 3e-3) for x in soft]
    np.testing.assert_allclose(token_probabilities(a), smooth, rtol=1e-12)
    np.testing.assert_allclose(
        token_probabilities(a, temperature=1.0, smoothing=0.0),
        [math.exp(x) / sum(math.exp(y) for y in a) for x in a],
        rtol=1e-12,
    )


def test_token_probabilities_normalize_options():
    a = np.array([0.4, 0.2, 0.1, 0.05])
    # Raw attributions (public code): the temperature acts on their scale.
    assert not np.allclose(token_probabilities(a), token_probabilities(10 * a))
    for mode in ("sum", "max"):
        np.testing.assert_allclose(
            token_probabilities(a, normalize=mode),
            token_probabilities(10 * a, normalize=mode),
            rtol=1e-12,
        )
    np.testing.assert_allclose(
        token_probabilities(a, normalize="sum"), token_probabilities(a / a.sum()), rtol=1e-12
    )
    np.testing.assert_allclose(
        token_probabilities(a, normalize="max"), token_probabilities(a / a.max()), rtol=1e-12
    )
    # all-zero attributions: uniform
    np.testing.assert_allclose(token_probabilities(np.zeros(4), normalize="sum"), 0.25)


def test_choose_tokens_draws_follow_the_sequential_categorical():
    a = np.array([0.20, 0.15, 0.10, 0.05, 0.0])
    p = token_probabilities(a)
    n = 2000
    draws = np.stack([choose_tokens(a, k=2, key=k) for k in _keys(n)])
    assert draws.shape == (n, 2) and draws.dtype == np.int64
    assert np.all(draws[:, 0] != draws[:, 1])
    first = np.bincount(draws[:, 0], minlength=5) / n
    assert _within(first, p, n)
    # second draw of sampling without replacement: sum_i p_i p_j / (1 - p_i), i != j
    second_p = np.array(
        [sum(p[i] * p[j] / (1 - p[i]) for i in range(5) if i != j) for j in range(5)]
    )
    second = np.bincount(draws[:, 1], minlength=5) / n
    assert _within(second, second_p, n)
    # and it is not the uniform choice
    assert not _within(first, np.full(5, 0.2), n)


def test_choose_tokens_picks_a_dominant_token_almost_always():
    a = [0.1, 0.2, 5.0, 0.1, 0.3, 0.0]
    first = [int(choose_tokens(a, k=1, key=k)[0]) for k in _keys(400, seed=1)]
    assert np.mean(np.array(first) == 2) >= 0.98  # p = 0.995 here


def test_choose_tokens_distinct_reproducible_and_keyed():
    a = np.random.default_rng(0).uniform(0, 0.5, size=12)
    for k in (1, 3, 8, 12):
        out = choose_tokens(a, k=k, key=KEY)
        assert out.shape == (k,) and len(set(out.tolist())) == k
        assert out.min() >= 0 and out.max() < 12
    assert sorted(choose_tokens(a, k=12, key=KEY).tolist()) == list(range(12))
    np.testing.assert_array_equal(choose_tokens(a, k=4, key=KEY), choose_tokens(a, k=4, key=KEY))
    outs = {tuple(choose_tokens(a, k=4, key=k).tolist()) for k in _keys(10)}
    assert len(outs) > 1
    # raw uint32 keys work as well
    assert choose_tokens(a, k=2, key=jax.random.PRNGKey(3)).shape == (2,)


@pytest.mark.parametrize(
    "args, match",
    [
        (([0.1, 0.2], 0), "k must be at least 1"),
        (([0.1, 0.2], 3), "k larger than the number of tokens"),
        (([], 1), "empty"),
        (([0.1, float("nan")], 1), "finite"),
        (([0.1, float("inf")], 1), "finite"),
        (([0.1, -0.2], 1), "non-negative"),
        (([[0.1, 0.2]], 1), "one-dimensional"),
        (([0.1, 0.2], 1.5), "k must be an integer"),
    ],
)
def test_choose_tokens_errors(args, match):
    attributions, k = args
    with pytest.raises(ValueError, match=match):
        choose_tokens(attributions, k=k, key=KEY)


def test_choose_tokens_setting_errors():
    with pytest.raises(ValueError, match="temperature"):
        choose_tokens([0.1, 0.2], k=1, key=KEY, temperature=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        choose_tokens([0.1, 0.2], k=1, key=KEY, smoothing=-1e-3)
    with pytest.raises(ValueError, match="normalize"):
        choose_tokens([0.1, 0.2], k=1, key=KEY, normalize="softmax")
    # without smoothing, underflowed tokens cannot be drawn
    with pytest.raises(ValueError, match="nonzero probability"):
        choose_tokens([100.0, 0.0, 0.0], k=2, key=KEY, smoothing=0.0)
    assert choose_tokens([100.0, 0.0, 0.0], k=1, key=KEY, smoothing=0.0).tolist() == [0]


def test_uniform_tokens():
    n = 1500
    draws = np.stack([uniform_tokens(4, k=2, key=k) for k in _keys(n, seed=2)])
    assert np.all(draws[:, 0] != draws[:, 1])
    assert _within(np.bincount(draws[:, 0], minlength=4) / n, np.full(4, 0.25), n)
    assert sorted(uniform_tokens(7, k=7, key=KEY).tolist()) == list(range(7))
    with pytest.raises(ValueError, match="k larger than the number of tokens"):
        uniform_tokens(3, k=4, key=KEY)
    with pytest.raises(ValueError, match="num_tokens"):
        uniform_tokens(0, k=1, key=KEY)
    with pytest.raises(ValueError, match="k must be at least 1"):
        uniform_tokens(3, k=0, key=KEY)


# ------------------------------------------------------------------------------------------
# selected_words
# ------------------------------------------------------------------------------------------

# "a painting of the great wave off kanagawa, by katsushika hokusai" in CLIP BPE style
WAVE = [
    "a</w>",
    "painting</w>",
    "of</w>",
    "the</w>",
    "great</w>",
    "wave</w>",
    "off</w>",
    "kana",
    "gawa</w>",
    ",</w>",
    "by</w>",
    "kat",
    "su",
    "shi",
    "ka</w>",
    "hok",
    "usai</w>",
]


def test_selected_words_merges_pieces_in_prompt_order():
    assert selected_words(WAVE, [14, 8, 9, 1]) == ["painting", "kanagawa", ",", "katsushika"]
    assert selected_words(WAVE, [7, 8, 12]) == ["kanagawa", "katsushika"]
    assert selected_words(WAVE, [15]) == ["hokusai"]
    assert selected_words(WAVE, []) == []
    assert selected_words(WAVE, np.array([5, 5])) == ["wave"]


def test_selected_words_duplicates_specials_bytes_and_truncation():
    tokens = [
        "<|startoftext|>",
        "the</w>",
        "cat</w>",
        "and</w>",
        "the</w>",
        "dog</w>",
        "<|endoftext|>",
    ]
    assert selected_words(tokens, [0, 1, 4, 6]) == ["the"]
    assert selected_words(tokens, [5, 2]) == ["cat", "dog"]
    # byte-level BPE pieces of non-ASCII text are decoded
    assert selected_words(["bj", "Ã¶rk</w>", "live</w>"], [1]) == ["björk"]
    # a truncated last word still counts
    assert selected_words(["the</w>", "kana"], [1]) == ["kana"]
    assert selected_words(["kana", "<|endoftext|>"], [0]) == ["kana"]


def test_selected_words_errors():
    with pytest.raises(ValueError, match="</w>"):
        selected_words(["kana", "gawa", "by"], [0])  # decoded strings, no word ends
    with pytest.raises(ValueError, match="out of range"):
        selected_words(WAVE, [len(WAVE)])
    with pytest.raises(ValueError, match="out of range"):
        selected_words(WAVE, [-1])
    with pytest.raises(ValueError, match="not one string"):
        selected_words("painting</w>", [0])


def _tiny_clip_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz,":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [
        "w a",
        "wa v",
        "wav e</w>",
        "k a",
        "ka n",
        "kan a",
        "g a",
        "ga w",
        "gaw a</w>",
        "o f",
        "of f</w>",
        "t h",
        "th e</w>",
        "a r",
        "ar t</w>",
    ]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))


def test_selected_words_and_vocabulary_with_a_real_clip_tokenizer(tmp_path):
    tok = _tiny_clip_tokenizer(tmp_path)
    tokens = tok.tokenize("The wave off Kanagawa, art")
    assert tokens == ["the</w>", "wave</w>", "off</w>", "kana", "gawa</w>", ",</w>", "art</w>"]
    assert selected_words(tokens, [3, 6]) == ["kanagawa", "art"]
    # ids -> tokens as the attribution code sees them
    ids = tok("The wave off Kanagawa, art")["input_ids"]
    assert selected_words(tok.convert_ids_to_tokens(ids), [4, 5]) == ["kanagawa"]
    assert clip_vocabulary_words(tok) == ["wave", "gawa", "off", "the", "art"]


def test_clip_vocabulary_words_filters():
    class Fake:
        def get_vocab(self):
            return {
                "cat</w>": 5,
                "ca": 1,
                "dog</w>": 2,
                "ox</w>": 3,
                "a1b</w>": 4,
                "Ã¶rk</w>": 6,
                "hello</w>": 0,
                ",,,</w>": 7,
            }

    assert clip_vocabulary_words(Fake()) == ["hello", "dog", "cat"]
    with pytest.raises(ValueError, match="get_vocab"):
        clip_vocabulary_words(object())


# ------------------------------------------------------------------------------------------
# SynonymRephraser
# ------------------------------------------------------------------------------------------


def test_shipped_synonym_table():
    table = load_synonyms()
    assert len(table) >= 300
    for word, syns in table.items():
        assert word.isalpha() and word == word.lower()
        assert syns and all(s.lower() != word for s in syns) and len(set(syns)) == len(syns)
    for number in ("one", "two", "three", "ten", "hundred", "thousand", "million"):
        assert number not in table
    for word in ("painting", "photo", "woman", "beautiful", "talk", "explain", "ethics"):
        assert word in table


def test_synonym_rephraser_changes_only_the_chosen_words():
    table = load_synonyms()
    prompt = "beautiful painting of a dog and a cat in the garden"
    out = SynonymRephraser()(prompt, ["painting", "dog", "garden"])
    before, after = prompt.split(" "), out.split(" ")
    assert len(after) == len(before)
    changed = [i for i, (b, a) in enumerate(zip(before, after)) if b != a]
    assert changed == [1, 4, 10]
    for i in changed:
        assert after[i] in table[before[i]]
    for seed in range(8):  # other seeds pick other synonyms, still only there
        out = SynonymRephraser(key=jax.random.key(seed))(prompt, ["painting", "dog", "garden"])
        after = out.split(" ")
        assert [i for i, (b, a) in enumerate(zip(before, after)) if b != a] == [1, 4, 10]
        assert all(after[i] in table[before[i]] for i in (1, 4, 10))


def test_synonym_rephraser_keeps_names_places_and_numbers():
    table = {
        "photo": ["picture"],
        "emma": ["gem"],
        "watson": ["x"],
        "paris": ["city"],
        "dogs": ["hounds"],
        "dog": ["hound"],
        "show": ["exhibition"],
        "nasa": ["agency"],
        "x": ["by"],
        "blk": ["black"],
        "in": ["inside"],
    }
    rephraser = SynonymRephraser(table=table)
    prompt = (
        "Photo of Emma Watson with 3 dogs in Paris, 2019 Dog Show, NASA photo, 13x8 31-984210BLK"
    )
    words = [
        "photo",
        "emma",
        "watson",
        "dogs",
        "paris",
        "dog",
        "show",
        "3",
        "2019",
        "nasa",
        "x",
        "blk",
        "in",
    ]
    assert rephraser(prompt, words) == (
        "Picture of Emma Watson with 3 hounds inside Paris, 2019 Dog Show, NASA picture, 13x8 "
        "31-984210BLK"
    )
    # nothing chosen that can change: byte-identical
    assert rephraser(prompt, ["emma", "3", "2019", "nasa", "x"]) == prompt
    assert rephraser(prompt, []) == prompt


def test_synonym_rephraser_punctuation_case_and_articles():
    table = {"painting": ["artwork"], "wave": ["breaker"], "special": ["unique"]}
    drop = SynonymRephraser(table=table)
    keep = SynonymRephraser(table=table, punctuation="keep")
    prompt = "The wave off Kanagawa, a painting - won't 4-1/4"
    assert drop(prompt, [","]) == "The wave off Kanagawa a painting - won't 4-1/4"
    assert drop(prompt, ["-"]) == "The wave off Kanagawa, a painting won't 4-1/4"
    assert drop(prompt, ["'", "/"]) == prompt  # inside a word or a number
    assert keep(prompt, [",", "-"]) == prompt
    assert drop("Painting of a wave", ["painting", "wave"]) == "Artwork of a breaker"
    assert drop("A painting, a special day", ["painting", "special"]) == (
        "An artwork, a unique day"
    )
    assert drop("painting An", ["painting"]) == "artwork An"
    assert drop("unknown words stay", ["unknown", "stay"]) == "unknown words stay"


def test_synonym_rephraser_inflections_and_seed():
    table = load_synonyms()
    r = SynonymRephraser()
    assert r("two dogs", ["dogs"]) == "two " + table["dog"][0][:-1] + "ies"  # puppy -> puppies
    assert table["explain"][0] == "clarify"
    assert r("he explains", ["explains"]) == "he clarifies"
    assert r("bigs today", ["bigs"]) == "bigs today"  # "big" is an adjective: no -s form
    assert r("news today", ["news"]) == "tidings today"  # its own entry
    prompt = "a beautiful dress"
    picks = {SynonymRephraser(key=jax.random.key(s))(prompt, ["beautiful"]) for s in range(20)}
    assert len(picks) >= 3
    assert all(p.split(" ")[1] in table["beautiful"] for p in picks)
    again = SynonymRephraser(key=jax.random.key(7))
    assert again(prompt, ["beautiful"]) == SynonymRephraser(key=jax.random.key(7))(
        prompt, ["beautiful"]
    )
    # the choices integer seeds gave before the rephraser took a key (the prompt world's runs)
    assert again(prompt, ["beautiful"]) == "a lovely dress"
    assert SynonymRephraser(key=jax.random.key(11))(prompt, ["beautiful"]) == "a pretty dress"


def test_synonym_rephraser_errors():
    with pytest.raises(ValueError, match="punctuation"):
        SynonymRephraser(punctuation="remove")
    with pytest.raises(TypeError, match="key"):
        SynonymRephraser(key=1.5)
    with pytest.raises(ValueError, match="table"):
        SynonymRephraser(table={"Dog": ["hound"]})
    with pytest.raises(ValueError, match="table"):
        SynonymRephraser(table={"dog": []})
    with pytest.raises(ValueError, match="words"):
        SynonymRephraser()("a dog", "dog")


# ------------------------------------------------------------------------------------------
# ChatRephraser against a local stub
# ------------------------------------------------------------------------------------------


class _Stub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.requests: list[dict] = []
        self.status = 200
        self.reply: bytes = b""
        self.delay = 0.0
        self.release = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _StubHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        server: _Stub = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server.requests.append(
            {"path": self.path, "headers": dict(self.headers), "body": json.loads(body)}
        )
        if server.delay:
            server.release.wait(server.delay)
        self.send_response(server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(server.reply)))
        self.end_headers()
        try:
            self.wfile.write(server.reply)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def stub(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = _Stub()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _completion(content) -> bytes:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        }
    ).encode()


def test_chat_rephraser_request_and_answer(stub):
    stub.reply = _completion('  "Discussions about the Precepts and Buddhist principles"\n')
    chat = ChatRephraser(stub.base, api_key="sk-test", model="m1", temperature=0.7)
    prompt = "Talks on the Precepts and Buddhist Ethics"
    out = chat(prompt, ["talks", "ethics"])
    assert out == "Discussions about the Precepts and Buddhist principles"
    (req,) = stub.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["body"]
    assert body["model"] == "m1" and body["temperature"] == 0.7
    assert body["messages"] == [
        {"role": "user", "content": chat_instruction(prompt, ["talks", "ethics"])}
    ]
    text = body["messages"][0]["content"]
    assert '["talks", "ethics"]' in text
    assert '["Talks", "on", "the", "Precepts", "and", "Buddhist", "Ethics"]' in text
    assert (
        "name" in text and "number" in text and "synonym" in text and "punctuation" in text.lower()
    )
    # a full URL is used as is
    ChatRephraser(stub.base + "/chat/completions/", api_key="k")(prompt, ["talks"])
    assert stub.requests[-1]["path"] == "/v1/chat/completions"


def test_chat_rephraser_failures(stub):
    chat = ChatRephraser(stub.base, api_key="sk-test", timeout=5)
    stub.status, stub.reply = 500, b'{"error": "boom"}'
    with pytest.raises(RuntimeError, match="HTTP 500.*boom"):
        chat("a dog", ["dog"])
    outcome = rephrase(chat, "a dog", ["dog"])
    assert outcome.prompt == "a dog" and not outcome.changed and "HTTP 500" in outcome.error
    assert "sk-test" not in outcome.error
    stub.status = 200
    for bad in (
        b"not json",
        b'{"choices": []}',
        b'{"choices": [{"message": {}}]}',
        _completion(None),
    ):
        stub.reply = bad
        with pytest.raises(ValueError, match="chat"):
            chat("a dog", ["dog"])
    stub.reply = _completion("")
    outcome = rephrase(chat, "a dog", ["dog"])
    assert outcome == RephraseOutcome("a dog", False, "rephraser returned an empty prompt")


def test_chat_rephraser_timeout(stub):
    stub.reply, stub.delay = _completion("late"), 5.0
    chat = ChatRephraser(stub.base, api_key="sk-test", timeout=0.3)
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        chat("a dog", ["dog"])
    outcome = rephrase(chat, "a dog", ["dog"])
    assert time.perf_counter() - start < 3
    assert outcome.prompt == "a dog" and "TimeoutError" in outcome.error


def test_chat_rephraser_key_and_url(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key.*OPENAI_API_KEY"):
        ChatRephraser("http://127.0.0.1:1/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    chat = ChatRephraser("https://example.invalid/v1/")
    assert chat.url == "https://example.invalid/v1/chat/completions"
    assert chat._api_key == "sk-env" and "sk-env" not in repr(chat)
    for url in ("example.com/v1", "ftp://x/v1", ""):
        with pytest.raises(ValueError, match="url"):
            ChatRephraser(url, api_key="k")
    with pytest.raises(ValueError, match="timeout"):
        ChatRephraser("http://x/v1", api_key="k", timeout=0)


# ------------------------------------------------------------------------------------------
# rephrase()
# ------------------------------------------------------------------------------------------


def test_rephrase_outcomes():
    assert rephrase(SynonymRephraser(table={"dog": ["hound"]}), "a dog", ["dog"]) == (
        RephraseOutcome("a hound", True, None)
    )
    assert rephrase(lambda p, w: p, "a dog", ["dog"]) == RephraseOutcome("a dog", False, None)

    def boom(prompt, words):
        raise ConnectionError("service down")

    assert rephrase(boom, "a dog", ["dog"]) == RephraseOutcome(
        "a dog", False, "ConnectionError: service down"
    )
    out = rephrase(lambda p, w: 42, "a dog", ["dog"])
    assert out.prompt == "a dog" and not out.changed and "int" in out.error
    seen = []
    rephrase(lambda p, w: seen.append(w) or p, "a dog", ("dog",))
    assert seen == [["dog"]]


def test_rephrase_timeout_and_errors():
    def slow(prompt, words):
        time.sleep(1.0)
        return "too late"

    start = time.perf_counter()
    out = rephrase(slow, "a dog", ["dog"], timeout=0.1)
    assert time.perf_counter() - start < 0.8
    assert out.prompt == "a dog" and not out.changed and "timed out" in out.error
    assert rephrase(lambda p, w: "a hound", "a dog", ["dog"], timeout=5.0) == RephraseOutcome(
        "a hound", True, None
    )

    def bad(prompt, words):
        raise KeyError("no such word")

    assert rephrase(bad, "a dog", [], timeout=5.0).error == "KeyError: 'no such word'"
    with pytest.raises(ValueError, match="prompt"):
        rephrase(lambda p, w: p, "  ", ["dog"])
    with pytest.raises(ValueError, match="words"):
        rephrase(lambda p, w: p, "a dog", "dog")
    with pytest.raises(ValueError, match="timeout"):
        rephrase(lambda p, w: p, "a dog", ["dog"], timeout=0)
    with pytest.raises(ValueError, match="callable"):
        rephrase("not a function", "a dog", ["dog"])


# ------------------------------------------------------------------------------------------
# Random token addition
# ------------------------------------------------------------------------------------------

VOCAB = ["qqa", "qqb", "qqc", "qqd"]
INSERTED = re.compile(r"^qq[a-d] | qq[a-d](?= |$)")


def test_random_token_addition_adds_k_words_and_keeps_the_prompt():
    prompt = "Talks on the  Precepts and Buddhist Ethics"
    gaps, picks = set(), set()
    for k, key in zip([1, 2, 4, 8] * 25, _keys(100, seed=3)):
        out = random_token_addition(prompt, k=k, key=key, vocabulary=VOCAB)
        words = out.split()
        added = [w for w in words if w in VOCAB]
        assert len(added) == k and len(words) == len(prompt.split()) + k
        assert [w for w in words if w not in VOCAB] == prompt.split()
        # deleting the inserted words gives the original bytes back
        restored = out
        while INSERTED.search(restored):
            restored = INSERTED.sub("", restored, count=1)
        assert restored == prompt
        picks.update(added)
        before = 0  # original words before each inserted one: its gap
        for w in words:
            if w in VOCAB:
                gaps.add(before)
            else:
                before += 1
    assert picks == set(VOCAB)
    assert gaps == set(range(len(prompt.split()) + 1))  # every gap, both ends included
    np.testing.assert_equal(
        random_token_addition(prompt, k=3, key=KEY, vocabulary=VOCAB),
        random_token_addition(prompt, k=3, key=KEY, vocabulary=VOCAB),
    )


def test_random_token_addition_errors():
    with pytest.raises(ValueError, match="prompt"):
        random_token_addition("   ", k=1, key=KEY, vocabulary=VOCAB)
    with pytest.raises(ValueError, match="k"):
        random_token_addition("a dog", k=0, key=KEY, vocabulary=VOCAB)
    with pytest.raises(ValueError, match="vocabulary"):
        random_token_addition("a dog", k=1, key=KEY, vocabulary=[])
    with pytest.raises(ValueError, match="vocabulary"):
        random_token_addition("a dog", k=1, key=KEY, vocabulary=["two words"])
