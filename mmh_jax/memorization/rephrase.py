"""Text-side mitigation of memorization: choosing prompt tokens from their attributions and
rephrasing them (paper, Section 4.2 and Appendix D.4).

Once a prompt is flagged as memorized, the paper perturbs the tokens that drive the memorization
metric: it samples ``k`` token positions *without replacement* from a categorical distribution
built from the token attributions, hands the caption and the chosen tokens to a rephraser
(GPT-4 following the four rules of Box 1) and regenerates the image. This module holds the
pieces that act on text only:

* :func:`choose_tokens` -- attribution-guided choice of ``k`` token positions
  (softmax with temperature and additive smoothing, as in the authors' public code);
  :func:`uniform_tokens` -- the paper's ablation, positions chosen uniformly.
* :func:`selected_words` -- from CLIP BPE tokens and chosen positions to the prompt words that
  hold them.
* :data:`Rephraser` -- the pluggable ``(prompt, words) -> new prompt`` callable, with two
  implementations: :class:`SynonymRephraser` (offline, a synonym table shipped with the package,
  never touching names, places or numbers) and :class:`ChatRephraser` (any OpenAI-compatible
  chat-completions endpoint, standard library only, never needed).
* :func:`rephrase` -- calls a rephraser and keeps the original prompt, with the error reported,
  when the rephraser fails, times out or answers nonsense, so a batch run goes on.
* :func:`random_token_addition` -- the RTA baseline of Somepalli et al. (2023a): ``k`` random
  vocabulary words inserted at random word positions; :func:`clip_vocabulary_words` draws the
  vocabulary from a CLIP tokenizer.

Differences from the public code, on purpose: ``k`` larger than the number of tokens is an
error here (the public code silently lowers ``k``), and all randomness comes from an explicit JAX
key.

Nothing here fetches anything at run time: the synonym table is a JSON file in
``mmh_jax/memorization/data/`` and the chat adapter talks only to the URL it is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any, Literal, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from mmh_jax._src.checks import check_strings
from mmh_jax._src.rng import key_seed, numpy_generator

__all__ = [
    "choose_tokens",
    "token_probabilities",
    "uniform_tokens",
    "selected_words",
    "Rephraser",
    "SynonymRephraser",
    "load_synonyms",
    "ChatRephraser",
    "chat_instruction",
    "RephraseOutcome",
    "rephrase",
    "random_token_addition",
    "clip_vocabulary_words",
]

Rephraser: TypeAlias = Callable[[str, Sequence[str]], str]
"""A rephraser: ``rephraser(prompt, words) -> new_prompt``, where ``words`` are the prompt words
to perturb (for example :func:`selected_words` of the chosen tokens). It may raise; wrap calls
in :func:`rephrase` to keep a run going when it does."""

_END_OF_WORD = "</w>"
_SPECIAL_TOKENS = frozenset({"<|startoftext|>", "<|endoftext|>"})


# --------------------------------------------------------------------------------------------
# Choosing tokens
# --------------------------------------------------------------------------------------------


def _check_k(k: int, n: int, *, what: str = "tokens") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > n:
        raise ValueError(f"k larger than the number of {what}: k={k}, {what}={n}")
    return k


def token_probabilities(
    attributions: Any,
    *,
    temperature: float = 0.1,
    smoothing: float = 1e-3,
    normalize: Literal["none", "sum", "max"] = "none",
) -> np.ndarray:
    """The categorical distribution over token positions that :func:`choose_tokens` samples.

    ``p = softmax(a / temperature)``, then ``p <- (p + smoothing) / sum(p + smoothing)``, where
    ``a`` are the attributions after the optional rescaling ``normalize``:

    * ``"none"`` (default): the raw attributions. This is what the authors' public code does
      (its GPT-perturbation script takes the stored per-token gradient norms, applies a softmax
      to attribution / temperature, adds 1e-3 and renormalises, then draws without replacement
      with NumPy's global generator), so the softmax itself is the "normalizing the attributions
      across the tokens" of Section 4.2. The temperature then acts on the attributions' own
      scale, which differs between metrics (A^CFG, A^sCFG, A^FLIPD): gradient norms much larger
      than the temperature make the first draw nearly the arg-max, with the smoothing spreading
      the later draws almost uniformly.
    * ``"sum"``: ``a / sum(a)`` first, making the distribution independent of the metric's scale
      (an all-zero vector stays zero, giving the uniform distribution).
    * ``"max"``: ``a / max(a)`` first, likewise scale-free, with the top token at 1.

    Args:
        attributions: non-negative, finite per-token attributions, shape ``[n]``, ``n >= 1``.
        temperature: softmax temperature, ``> 0`` (public code: 0.1).
        smoothing: additive smoothing of the probabilities, ``>= 0`` (public code: 1e-3); it keeps
            every token possible, so sampling many tokens without replacement never runs out.
        normalize: rescaling of the attributions before the softmax (see above).

    Returns:
        float64 probabilities, shape ``[n]``, summing to 1.
    """
    a = np.asarray(attributions)
    if a.ndim != 1:
        raise ValueError(f"attributions must be one-dimensional, got shape {a.shape}")
    if a.size == 0:
        raise ValueError("attributions is empty: there are no tokens to choose from")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ValueError(f"attributions must be real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("attributions must be finite (found nan or inf)")
    if np.any(a < 0):
        raise ValueError("attributions must be non-negative (they are gradient norms)")
    if not (
        isinstance(temperature, (int, float, np.floating))
        and math.isfinite(temperature)
        and temperature > 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (
        isinstance(smoothing, (int, float, np.floating))
        and math.isfinite(smoothing)
        and smoothing >= 0
    ):
        raise ValueError(f"smoothing must be a finite number >= 0, got {smoothing!r}")
    if normalize == "sum":
        total = a.sum()
        a = a / total if total > 0 else a
    elif normalize == "max":
        top = a.max()
        a = a / top if top > 0 else a
    elif normalize != "none":
        raise ValueError(f"normalize must be 'none', 'sum' or 'max', got {normalize!r}")
    logits = a / float(temperature)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    p = p + float(smoothing)
    return p / p.sum()


@jax.jit
def _gumbel_order(key: jax.Array, log_p: jax.Array) -> jax.Array:
    # Gumbel-top-k: sorting log p_i + Gumbel noise in decreasing order lists the positions as
    # successive draws without replacement from the categorical p (each later draw renormalised
    # over the positions left); the first k are a draw of k. Compiled once per number of tokens.
    return jnp.argsort(-(log_p + jax.random.gumbel(key, log_p.shape, log_p.dtype)))


def choose_tokens(
    attributions: Any,
    *,
    k: int,
    key: jax.Array,
    temperature: float = 0.1,
    smoothing: float = 1e-3,
    normalize: Literal["none", "sum", "max"] = "none",
) -> np.ndarray:
    """Sample ``k`` token positions without replacement, favouring high attributions.

    The distribution is :func:`token_probabilities` (softmax of attribution / temperature with
    additive smoothing; by default on the raw attributions, as the authors' public code does --
    see there). Draws are sequential without replacement: the first position is drawn from
    ``p``, each next one from ``p`` renormalised over the positions not yet drawn (implemented as
    Gumbel-top-k, which has exactly this law). The result is in draw order.

    Args:
        attributions: non-negative, finite per-token attributions, shape ``[n]``.
        k: number of positions, ``1 <= k <= n``.
        key: a JAX PRNG key, the only source of randomness.
        temperature: softmax temperature, ``> 0`` (public code: 0.1).
        smoothing: additive probability smoothing, ``>= 0`` (public code: 1e-3).
        normalize: ``"none"``, ``"sum"`` or ``"max"``; see :func:`token_probabilities`.

    Returns:
        int64 array of ``k`` distinct positions in ``[0, n)``, in the order drawn.

    Raises:
        ValueError: empty, non-finite or negative attributions; ``k < 1``; ``k`` larger than the
            number of tokens (or, with ``smoothing=0``, than the tokens of nonzero probability);
            a bad ``temperature``, ``smoothing`` or ``normalize``.
    """
    p = token_probabilities(
        attributions, temperature=temperature, smoothing=smoothing, normalize=normalize
    )
    k = _check_k(k, p.size)
    possible = int(np.count_nonzero(p))
    if k > possible:
        raise ValueError(
            f"k larger than the number of tokens with nonzero probability: k={k}, "
            f"tokens={possible}; use smoothing > 0"
        )
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    return np.asarray(_gumbel_order(key, log_p.astype(np.float32)), dtype=np.int64)[:k]


def uniform_tokens(num_tokens: int, *, k: int, key: jax.Array) -> np.ndarray:
    """``k`` distinct token positions drawn uniformly (the paper's ablation that ignores the
    attributions; Section 4.2, Figure 7a).

    Args:
        num_tokens: number of prompt tokens ``n >= 1``.
        k: number of positions, ``1 <= k <= n``.
        key: a JAX PRNG key.

    Returns:
        int64 array of ``k`` distinct positions in ``[0, n)``, in the order drawn.
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
        raise ValueError(f"num_tokens must be an integer, got {num_tokens!r}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
    k = _check_k(k, int(num_tokens))
    order = _gumbel_order(key, np.zeros((int(num_tokens),), np.float32))
    return np.asarray(order, dtype=np.int64)[:k]


# --------------------------------------------------------------------------------------------
# Tokens -> words
# --------------------------------------------------------------------------------------------


@functools.cache
def _byte_decoder() -> dict[str, int]:
    # The byte-level BPE alphabet of GPT-2/CLIP: printable Latin-1 bytes stand for themselves,
    # the other bytes are shifted to code points 256 and up, in byte order.
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in keep}
    shift = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def _decode_word(text: str) -> str:
    """Byte-level BPE text back to Unicode; text that is not byte-level BPE is kept as is."""
    decoder = _byte_decoder()
    if all(c in decoder for c in text):
        try:
            return bytes(decoder[c] for c in text).decode("utf-8")
        except UnicodeDecodeError:
            pass
    return text


def selected_words(tokens: Sequence[str], chosen: Sequence[int]) -> list[str]:
    """The prompt words that hold the chosen tokens.

    ``tokens`` are CLIP BPE token strings, as ``tokenizer.convert_ids_to_tokens(ids)`` or
    ``tokenizer.tokenize(prompt)`` give them: a word is a run of pieces closed by a piece ending
    in ``"</w>"`` (``["kana", "gawa</w>", ",</w>"]`` holds the words ``"kanagawa"`` and ``","``);
    the end of the list also closes a word (a truncated prompt). Words are CLIP's pre-tokens:
    lower-cased letter runs, single digits, runs of punctuation and contractions such as
    ``"'s"``; byte-level pieces of non-ASCII text are decoded (``"bjÃ¶rk</w>"`` -> ``"björk"``).
    Special tokens (``<|startoftext|>``, ``<|endoftext|>``) are not words and are skipped.

    Args:
        tokens: the prompt's BPE tokens, in order.
        chosen: positions into ``tokens`` (for example from :func:`choose_tokens`).

    Returns:
        The distinct words holding a chosen token, in prompt order (a word chosen through several
        of its pieces, or twice in the prompt, is listed once).
    """
    tokens = check_strings(tokens, "tokens", what="token strings", allow_empty=True)
    for t in tokens:
        if not isinstance(t, str) or not t:
            raise ValueError(f"tokens must be non-empty strings, got {t!r}")
    n = len(tokens)
    real = [t for t in tokens if t not in _SPECIAL_TOKENS]
    if len(real) > 1 and not any(t.endswith(_END_OF_WORD) for t in real):
        raise ValueError(
            "tokens carry no '</w>' word ends: pass CLIP BPE tokens "
            "(tokenizer.convert_ids_to_tokens), not decoded strings"
        )
    positions = set()
    for c in chosen:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ValueError(f"chosen must hold integer positions, got {c!r}")
        if not 0 <= int(c) < n:
            raise ValueError(f"chosen position {int(c)} out of range for {n} tokens")
        positions.add(int(c))

    words: list[str] = []
    pieces: list[str] = []
    hit = False

    def close_word() -> None:
        word = _decode_word("".join(pieces))
        if hit and word and word not in words:
            words.append(word)

    for i, t in enumerate(tokens):
        if t in _SPECIAL_TOKENS:  # a boundary, never a word
            close_word()
            pieces, hit = [], False
            continue
        pieces.append(t[: -len(_END_OF_WORD)] if t.endswith(_END_OF_WORD) else t)
        hit = hit or i in positions
        if t.endswith(_END_OF_WORD):
            close_word()
            pieces, hit = [], False
    close_word()  # a truncated last word
    return words


# --------------------------------------------------------------------------------------------
# Offline rephraser: synonym substitution
# --------------------------------------------------------------------------------------------

_SYNONYM_FILE = "synonyms.json"
_SECTIONS = ("nouns", "verbs", "adjectives", "other")
_TAKES_S = ("nouns", "verbs")  # plural nouns and third-person verbs add -s/-es/-ies


@functools.cache
def _shipped_table() -> tuple[dict[str, tuple[str, ...]], frozenset[str]]:
    text = (
        resources.files("mmh_jax.memorization")
        .joinpath("data", _SYNONYM_FILE)
        .read_text(encoding="utf-8")
    )
    data = json.loads(text)
    if not isinstance(data, dict) or set(data) != set(_SECTIONS):
        raise ValueError(f"{_SYNONYM_FILE} must hold exactly the sections {_SECTIONS}")
    merged: dict[str, list[str]] = {}
    takes_s: set[str] = set()
    for section in _SECTIONS:
        part = _check_table(data[section], f"{_SYNONYM_FILE} [{section}]")
        for word, synonyms in part.items():
            merged.setdefault(word, [])
            merged[word] += [s for s in synonyms if s not in merged[word]]
            if section in _TAKES_S:
                takes_s.add(word)
    return {w: tuple(s) for w, s in merged.items()}, frozenset(takes_s)


def _check_table(table: Mapping[str, Sequence[str]], name: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(table, Mapping):
        raise ValueError(f"{name} must map words to lists of synonyms")
    out: dict[str, tuple[str, ...]] = {}
    for word, synonyms in table.items():
        if not isinstance(word, str) or not word.isalpha() or word != word.lower():
            raise ValueError(f"{name}: keys must be lower-case alphabetic words, got {word!r}")
        if isinstance(synonyms, str) or not isinstance(synonyms, Sequence) or not synonyms:
            raise ValueError(f"{name}: {word!r} must map to a non-empty list of synonyms")
        for s in synonyms:
            if not isinstance(s, str) or not s.strip() or s.lower() == word:
                raise ValueError(f"{name}: bad synonym {s!r} for {word!r}")
        out[word] = tuple(synonyms)
    return out


def load_synonyms() -> dict[str, tuple[str, ...]]:
    """The synonym table shipped with the package (``mmh_jax/memorization/data/synonyms.json``).

    A compact table written for this package: common English words of image captions (nouns,
    verbs and adjectives in their base form, a few adverbs and prepositions) mapped to a few
    synonyms each, closest first. Proper names and number words are deliberately absent.

    Returns:
        A new dict ``{word: (synonym, ...)}`` with lower-case keys.
    """
    return dict(_shipped_table()[0])


_LETTERS = re.compile(r"[^\W\d_]+")
_PUNCT = re.compile(r"(?:[^\s\w]|_)+")


def _match_case(replacement: str, original: str) -> str:
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


_ARTICLE_BEFORE = re.compile(r"(?<![^\W\d_])([Aa]n?)[ \t]+$")
_AN_EXCEPTIONS = re.compile(r"(?:hour|honest|honou?r|heir)")
_A_EXCEPTIONS = re.compile(r"(?:uni|use|usu|uti|eu|ewe|one|once)")


def _indefinite_article(phrase: str) -> str:
    """``"a"`` or ``"an"`` for the phrase, by its spelling (with the common exceptions)."""
    w = phrase.lower()
    if _AN_EXCEPTIONS.match(w):
        return "an"
    if _A_EXCEPTIONS.match(w):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def _plural(phrase: str) -> str:
    head, _, last = phrase.rpartition(" ")
    if re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


class SynonymRephraser:
    """Offline rephraser: each selected word becomes a synonym from a table; nothing else moves.

    Follows the paper's Box 1 rules conservatively, without any service:

    * a selected word is replaced wherever it occurs in the prompt (matched case-insensitively as
      a whole run of letters), by the same synonym everywhere, with the case of its first letter
      kept; every other byte of the prompt is unchanged, except that an indefinite article
      right before a replaced word follows the synonym (``"a painting"`` -> ``"an artwork"``);
    * names of people, places and cultures are never replaced (rule 3): an occurrence with an
      upper-case letter is left alone, except the prompt's first word when only its first letter
      is upper-case (sentence case); all-caps words are left alone too;
    * numbers are never replaced, nor letters inside a whitespace-delimited chunk that holds a
      digit (``"13x8"``, ``"31-984210BLK"``); rule 2 would allow a close number, this rephraser
      keeps it;
    * a selected punctuation-only word (rule 1) is deleted with ``punctuation="drop"`` (default)
      -- every occurrence not inside a word or number (``"won't"``, ``"4-1/4"`` keep theirs),
      with one neighbouring space when it stood alone between spaces -- or kept with
      ``punctuation="keep"``;
    * a word missing from the table stays unchanged, so the returned prompt may equal the input
      (:func:`rephrase` reports that as ``changed=False``). With the shipped table the ``-s``,
      ``-es``, ``-ies`` forms of its nouns (plurals) and verbs (third person) are recognised too
      and the synonym gets the same ending; other inflections (``-ed``, ``-ing``) are not.

    The substitution knows no context: a word with several senses gets its table's synonyms
    whatever the sense in the prompt (the shipped table leaves out the most ambiguous caption
    words, such as "light", "top" or "watch"). For context-aware rephrasing as in the paper, use
    :class:`ChatRephraser`.

    Args:
        table: ``{lower-case word: [synonyms, closest first]}``, matched exactly (no inflected
            forms); default: the shipped table (:func:`load_synonyms`).
        key: ``None`` (default) takes the first synonym; a PRNG key picks among the synonyms by
            a hash of ``(key, prompt, word)`` (the key's data read as one integer: ``seed`` for
            ``jax.random.key(seed)``), so a call is reproducible and different keys give
            different rephrasings (the paper draws five per prompt and ``k``).
        punctuation: ``"drop"`` or ``"keep"`` for selected punctuation (see above).
    """

    def __init__(
        self,
        *,
        table: Mapping[str, Sequence[str]] | None = None,
        key: jax.Array | None = None,
        punctuation: Literal["drop", "keep"] = "drop",
    ) -> None:
        if table is None:
            shipped, self._takes_s = _shipped_table()
            self.table = dict(shipped)  # a copy: the cached table stays pristine
        else:
            self.table, self._takes_s = _check_table(table, "table"), frozenset()
        if punctuation not in ("drop", "keep"):
            raise ValueError(f"punctuation must be 'drop' or 'keep', got {punctuation!r}")
        self._seed = None if key is None else key_seed(key)
        self.punctuation = punctuation

    def __repr__(self) -> str:
        key = "None" if self._seed is None else f"<seed {self._seed}>"
        return (
            f"SynonymRephraser(table=<{len(self.table)} words>, key={key}, "
            f"punctuation={self.punctuation!r})"
        )

    def synonym(self, word: str, *, prompt: str = "") -> str | None:
        """The replacement this rephraser uses for ``word`` (lower case), or ``None``.

        Args:
            word: a word, any case.
            prompt: the prompt it comes from (mixed into the choice when ``key`` is set).

        Returns:
            A synonym in lower case (pluralised for a plural of a table word), or ``None`` when
            the table has none.
        """
        w = word.lower()
        plural = False
        options = self.table.get(w)
        if options is None and len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            for stem in (
                w[:-3] + "y" if w.endswith("ies") else None,
                w[:-2] if w.endswith("es") else None,
                w[:-1],
            ):
                if stem and stem in self._takes_s:
                    options, plural = self.table[stem], True
                    break
        if not options:
            return None
        if self._seed is None:
            choice = options[0]
        else:
            digest = hashlib.sha256(f"{self._seed}\0{prompt}\0{w}".encode()).digest()
            choice = options[int.from_bytes(digest[:8], "little") % len(options)]
        return _plural(choice) if plural else choice

    def __call__(self, prompt: str, words: Sequence[str]) -> str:
        """Replace ``words`` in ``prompt``; see the class docstring for the rules.

        Args:
            prompt: the caption.
            words: the words to perturb (e.g. :func:`selected_words`); case-insensitive.

        Returns:
            The new prompt (equal to ``prompt`` when no selected word could be replaced).
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        words = check_strings(words, "words", what="words", allow_empty=True)
        targets = {w.lower() for w in words if isinstance(w, str) and _LETTERS.fullmatch(w)}
        puncts = {w for w in words if isinstance(w, str) and _PUNCT.fullmatch(w)}
        chunks = [(m.start(), m.end()) for m in re.finditer(r"\S+", prompt)]
        first = _LETTERS.search(prompt)
        edits: list[tuple[int, int, str]] = []

        for m in _LETTERS.finditer(prompt):
            text = m.group()
            if text.lower() not in targets:
                continue
            upper_at = [i for i, c in enumerate(text) if c.isupper()]
            sentence_case = first is not None and m.start() == first.start() and upper_at == [0]
            if upper_at and not sentence_case:
                continue  # a name, a place, an acronym
            chunk = next(c for c in chunks if c[0] <= m.start() < c[1])
            if any(ch.isdigit() for ch in prompt[chunk[0] : chunk[1]]):
                continue  # part of a number, a size or a product code
            replacement = self.synonym(text, prompt=prompt)
            if replacement is None:
                continue
            edits.append((m.start(), m.end(), _match_case(replacement, text)))
            article = _ARTICLE_BEFORE.search(prompt, 0, m.start())
            if article is not None:
                wanted = _indefinite_article(replacement)
                if article.group(1).lower() != wanted:
                    edits.append(
                        (article.start(1), article.end(1), _match_case(wanted, article.group(1)))
                    )

        if self.punctuation == "drop" and puncts:
            for m in _PUNCT.finditer(prompt):
                if m.group() not in puncts:
                    continue
                before = prompt[m.start() - 1] if m.start() > 0 else " "
                after = prompt[m.end()] if m.end() < len(prompt) else " "
                if before.isalnum() and after.isalnum():
                    continue  # inside a word or a number
                start, end = m.start(), m.end()
                if before == " " and after == " " and start > 0:
                    start -= 1  # "a , b" -> "a b"
                elif before == " " and after == " " and end < len(prompt):
                    end += 1
                edits.append((start, end, ""))

        out, last = [], 0
        for start, end, text in sorted(edits):
            if start < last:
                continue
            out.append(prompt[last:start])
            out.append(text)
            last = end
        out.append(prompt[last:])
        return "".join(out)


# --------------------------------------------------------------------------------------------
# Chat-completions rephraser
# --------------------------------------------------------------------------------------------

_PROMPT_TOKENS = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+(?:[.,]\d+)*|[^\s\w]+|_+")


def chat_instruction(prompt: str, words: Sequence[str]) -> str:
    """The instruction :class:`ChatRephraser` sends: the paper's four rules (Box 1), reworded.

    Args:
        prompt: the caption.
        words: the words to perturb.

    Returns:
        The user message: the caption as a list of tokens, the tokens to perturb, the rules, and
        the request to answer with the new caption only.
    """
    tokens = _PROMPT_TOKENS.findall(prompt)
    return (
        "Here is an image caption, written out as a list of tokens:\n"
        f"{json.dumps(tokens, ensure_ascii=False)}\n"
        "Write a new version of this caption in which these tokens are perturbed:\n"
        f"{json.dumps(list(words), ensure_ascii=False)}\n"
        "How to treat each token to perturb:\n"
        "1. Punctuation or a special character that carries little meaning may be deleted or "
        "swapped for another special character.\n"
        "2. A number may be changed into a nearby number.\n"
        "3. A proper name -- of a person, a place or a culture -- must stay exactly as it is.\n"
        "4. Any other word may be exchanged for, or reworded into, a synonym that fits the "
        "context.\n"
        "Everything else should keep the caption's meaning as close to the original as "
        "possible. Reply with the new caption alone, as ordinary text rather than a list of "
        "tokens, and add nothing else.\n"
    )


class ChatRephraser:
    """Rephraser backed by an OpenAI-compatible chat-completions endpoint (paper, Appendix D.4:
    GPT-4 following Box 1). Optional: nothing in the package needs it, and it sends nothing until
    called.

    Each call POSTs ``{"model", "messages": [{"role": "user", "content": instruction}],
    "temperature"}`` as JSON with ``Authorization: Bearer <key>`` to ``{url}/chat/completions``
    (or to ``url`` itself when it already ends with ``/chat/completions``), using only the
    standard library (proxies from the environment apply, as in ``urllib``). The instruction is
    :func:`chat_instruction`. The answer is ``choices[0].message.content``, stripped of
    surrounding whitespace and of one pair of enclosing quotes.

    Args:
        url: the API base (e.g. ``"https://api.openai.com/v1"``) or the full chat-completions URL;
            ``http://`` or ``https://``.
        api_key: the bearer key; ``None`` reads the ``OPENAI_API_KEY`` environment variable. A
            local server that needs no key still needs some non-empty string.
        model: model name sent in the request (the public code used ``"gpt-4o"``).
        timeout: seconds to wait for the connection and for the answer.
        temperature: sampling temperature sent in the request.

    Raises:
        ValueError: at construction, a bad ``url``/``timeout``/``model``, or no key in either
            ``api_key`` or ``OPENAI_API_KEY``. Calls raise ``TimeoutError`` (no answer in
            ``timeout``), ``RuntimeError`` (HTTP error status or unreachable server) or
            ``ValueError`` (an answer that is not chat-completions JSON).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str = "gpt-4o",
        timeout: float = 30.0,
        temperature: float = 1.0,
    ) -> None:
        if not isinstance(url, str) or not re.match(r"https?://[^/\s]+", url):
            raise ValueError(f"url must be an http:// or https:// URL, got {url!r}")
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ValueError("no API key for the chat endpoint: pass api_key or set OPENAI_API_KEY")
        self._api_key = key
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        self.model = model
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        if not (
            isinstance(temperature, (int, float))
            and math.isfinite(temperature)
            and temperature >= 0
        ):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        self.temperature = float(temperature)

    def __repr__(self) -> str:  # never shows the key
        return (
            f"ChatRephraser({self.url!r}, api_key=<hidden>, model={self.model!r}, "
            f"timeout={self.timeout!r})"
        )

    def __call__(self, prompt: str, words: Sequence[str]) -> str:
        """Ask the endpoint for a rephrasing of ``prompt`` perturbing ``words``.

        Args:
            prompt: the caption.
            words: the words to perturb.

        Returns:
            The endpoint's new caption.
        """
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": chat_instruction(prompt, words)}],
                "temperature": self.temperature,
            }
        ).encode("utf-8")
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self._api_key}",
            },
        )
        opener = urllib.request.build_opener()  # reads proxy settings now, not at import
        try:
            with opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read(500).decode("utf-8", "replace").strip()
            raise RuntimeError(
                f"chat endpoint {self.url} answered HTTP {e.code} {e.reason}: {detail}"
            ) from None
        except TimeoutError as e:
            raise TimeoutError(
                f"chat endpoint {self.url} gave no answer in {self.timeout:g} s"
            ) from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise TimeoutError(
                    f"chat endpoint {self.url} gave no answer in {self.timeout:g} s"
                ) from e
            raise RuntimeError(f"chat endpoint {self.url} unreachable: {e.reason}") from e
        try:
            content = json.loads(raw.decode("utf-8"))["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise ValueError(
                f"chat endpoint {self.url} answered something that is not a "
                f"chat completion: {raw[:200]!r}"
            ) from e
        if not isinstance(content, str):
            raise ValueError(f"chat endpoint {self.url} answered a non-text message: {content!r}")
        answer = content.strip()
        closing = {'"': '"', "'": "'", "“": "”"}.get(answer[:1])
        if closing is not None and len(answer) >= 2 and answer.endswith(closing):
            answer = answer[1:-1].strip()
        return answer


# --------------------------------------------------------------------------------------------
# Calling a rephraser safely
# --------------------------------------------------------------------------------------------


class RephraseOutcome(NamedTuple):
    """Result of :func:`rephrase`.

    Attributes:
        prompt: the new prompt, or the original one when the rephraser failed.
        changed: whether ``prompt`` differs from the original.
        error: ``None`` on success, else a one-line description of the failure (the exception's
            type and message, a timeout, or an unusable answer).
    """

    prompt: str
    changed: bool
    error: str | None


def rephrase(
    rephraser: Rephraser,
    prompt: str,
    words: Sequence[str],
    *,
    timeout: float | None = None,
) -> RephraseOutcome:
    """Call ``rephraser(prompt, words)``, keeping the original prompt if anything goes wrong.

    Any exception the rephraser raises, an answer that is not a string or is blank, or (with
    ``timeout``) no answer in time, gives ``RephraseOutcome(prompt, False, error)`` so a batch of
    mitigations goes on and the failure is reported. With ``timeout`` the call runs in a daemon
    thread that is abandoned, not stopped, when time runs out (a :class:`ChatRephraser` has its
    own network timeout as well).

    Args:
        rephraser: a :data:`Rephraser`.
        prompt: the caption, non-empty.
        words: the words to perturb (a sequence of strings, not one string).
        timeout: seconds to wait for the rephraser, or ``None`` to wait as long as it takes.

    Returns:
        The :class:`RephraseOutcome`.

    Raises:
        ValueError: an empty or non-string ``prompt``, ``words`` given as one string, a
            non-callable ``rephraser`` or a bad ``timeout`` (caller errors, not rephraser ones).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if isinstance(words, (str, bytes)) or not isinstance(words, Iterable):
        raise ValueError("words must be a sequence of words (e.g. a list), not one string")
    if not callable(rephraser):
        raise ValueError(f"rephraser must be callable, got {type(rephraser).__name__}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
    words = list(words)

    if timeout is None:
        try:
            answer = rephraser(prompt, words)
        except Exception as e:  # noqa: BLE001 -- reported, the run goes on
            return RephraseOutcome(prompt, False, f"{type(e).__name__}: {e}")
    else:
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["answer"] = rephraser(prompt, words)
            except Exception as e:  # noqa: BLE001
                box["error"] = e

        worker = threading.Thread(target=work, name="rephrase", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            return RephraseOutcome(prompt, False, f"rephraser timed out after {timeout:g} s")
        if "error" in box:
            e = box["error"]
            return RephraseOutcome(prompt, False, f"{type(e).__name__}: {e}")
        answer = box.get("answer")

    if not isinstance(answer, str):
        return RephraseOutcome(
            prompt, False, f"rephraser returned {type(answer).__name__}, not a string"
        )
    if not answer.strip():
        return RephraseOutcome(prompt, False, "rephraser returned an empty prompt")
    return RephraseOutcome(answer, answer != prompt, None)


# --------------------------------------------------------------------------------------------
# Random token addition (RTA) baseline
# --------------------------------------------------------------------------------------------


def random_token_addition(prompt: str, *, k: int, key: jax.Array, vocabulary: Sequence[str]) -> str:
    """Insert ``k`` random vocabulary words at random word positions (RTA; Somepalli et al.,
    2023a; paper, Appendix D.4 and Figure 10).

    The prompt's whitespace-separated words define ``m + 1`` gaps (before the first word, between
    words, after the last). Each inserted word is drawn uniformly from ``vocabulary`` (with
    replacement) and placed in a gap drawn uniformly (several may share one gap), separated by a
    single space; the original text is otherwise kept byte for byte, so deleting the inserted
    words gives the prompt back.

    Args:
        prompt: the caption, non-empty.
        k: number of words to insert, ``>= 1``.
        key: a JAX PRNG key.
        vocabulary: candidate words without whitespace (e.g. :func:`clip_vocabulary_words`).

    Returns:
        The prompt with ``k`` more words.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    vocabulary = check_strings(vocabulary, "vocabulary", what="words")
    for w in vocabulary:
        if not isinstance(w, str) or not w or any(c.isspace() for c in w):
            raise ValueError(
                f"vocabulary entries must be non-empty words without spaces, got {w!r}"
            )
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", prompt)]
    rng = numpy_generator(key)
    picks = rng.integers(0, len(vocabulary), size=int(k))
    gaps = rng.integers(0, len(spans) + 1, size=int(k))
    inserted: dict[int, list[str]] = {}
    for g, w in zip(gaps.tolist(), picks.tolist()):
        inserted.setdefault(g, []).append(vocabulary[w])
    out, last = [], 0
    for g in range(len(spans) + 1):
        if g in inserted:
            extra = " ".join(inserted[g])
            if g == 0:
                out.append(prompt[: spans[0][0]] + extra + " ")
                last = spans[0][0]
            else:
                end = spans[g - 1][1]
                out.append(prompt[last:end] + " " + extra)
                last = end
    out.append(prompt[last:])
    return "".join(out)


def clip_vocabulary_words(tokenizer: Any) -> list[str]:
    """Whole alphabetic words of a CLIP tokenizer's vocabulary, for :func:`random_token_addition`.

    Keeps the entries that end a word (``"...</w>"``) and consist of at least three ASCII
    letters, with ``"</w>"`` stripped, in token-id order.

    Args:
        tokenizer: a ``transformers`` ``CLIPTokenizer`` (anything with ``get_vocab()`` mapping
            token strings to ids).

    Returns:
        The words, without duplicates.
    """
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise ValueError("tokenizer must have get_vocab() (a transformers CLIPTokenizer)")
    vocab = get_vocab()
    words: list[str] = []
    seen: set[str] = set()
    for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
        if not token.endswith(_END_OF_WORD):
            continue
        word = token[: -len(_END_OF_WORD)]
        if len(word) >= 3 and word.isascii() and word.isalpha() and word not in seen:
            seen.add(word)
            words.append(word)
    return words
