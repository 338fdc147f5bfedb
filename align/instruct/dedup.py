"""Near-duplicate filtering for Self-Instruct: exact, fast ROUGE-L against a growing instruction pool.

Self-Instruct (Wang et al. 2022) discards a generated instruction when its ROUGE-L F1 against any
instruction already in the pool (seeds included) is above 0.7, and adds it to the pool otherwise. The
reference code scores every candidate against every pool member one pair at a time with the
`rouge_score` package (about 11K pairs/s on one CPU core): quadratic in pure Python. `RougeLFilter`
makes exactly the same keep/discard decisions, much faster:

- each instruction is tokenized once, the way `rouge_score` does it (`rouge_tokenize`), and every
  distinct token becomes one character, so a token list is a short string;
- pool members whose token length alone rules out F1 > threshold are never scored (LCS <= min(m, n)
  bounds F1 by 2 min(m, n) / (m + n)); the pool is kept sorted by length, so the rest is one slice;
- the longest common subsequence of two token lists is then the LCS of two strings, which rapidfuzz
  computes bit-parallel in C++; its Indel similarity, 2 LCS / (m + n), is the F1 in exact arithmetic
  and screens the whole slice in one `process.cdist` call;
- the few pairs the screen lets through (within 1e-9 of the threshold or above it) are re-scored with
  the very floating-point operations `rouge_score` uses and compared with the same strict `>`, so a
  score of exactly the threshold is kept and one that rounds to just above it is discarded, in both.

Pure: no model, no I/O. Used by `align.self_instruct`; `scripts/bench_rouge_filter.py` measures it
against the reference loop.

`EmbeddingFilter` is the optional second check (off by default in the stage): cosine similarity of
sentence embeddings (all-MiniLM-L6-v2 by default) searched exactly with faiss, for paraphrases that share
too few words for ROUGE-L to catch.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Iterable

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Indel, LCSseq

from align.lm.models import resolve_embedding_model

# Self-Instruct's rule: a candidate whose ROUGE-L F1 with a pool member is above 0.7 is a near-duplicate.
DEFAULT_THRESHOLD = 0.7

# rouge_score.tokenize: lowercase, turn every run of characters outside [a-z0-9] into a space, split on
# whitespace, keep tokens matching ^[a-z0-9]+$. After the substitution only [a-z0-9] and spaces are left,
# so the tokens are exactly the maximal [a-z0-9] runs of the lowercased text. Non-ASCII letters (Chinese,
# Cyrillic, accented Latin) are separators, as in rouge_score: "café" -> ["caf"], "你好" -> [].
_TOKEN_RE = re.compile(r"[a-z0-9]+")

# Cosine similarity above which `EmbeddingFilter` calls two instructions paraphrases. A judgement call, not
# from the paper: with all-MiniLM-L6-v2 rewordings of one request score ~0.7-0.9 and different tasks on a
# shared topic up to ~0.75 (no clean cut), so 0.85 flags only close rewordings.
DEFAULT_EMBEDDING_THRESHOLD = 0.85

# Screening (length bounds, rapidfuzz's Indel score) keeps every pair within this of the threshold, far
# more than float noise; those pairs are re-scored exactly, so rounding can never flip a decision.
_SCREEN_MARGIN = 1e-9

# Token ids become code points; the UTF-16 surrogate block is skipped so every code string is valid text.
_SURROGATE_START, _SURROGATE_COUNT = 0xD800, 0x800
_MAX_TOKEN_ID = 0x10FFFF - _SURROGATE_COUNT


def _code_point(token_id: int) -> str:
    """The character standing for token number `token_id` (0 <= token_id <= 1,112,063)."""
    if token_id > _MAX_TOKEN_ID:
        raise RuntimeError("more than 1.1M distinct tokens: ROUGE-L code strings have run out of characters")
    return chr(token_id if token_id < _SURROGATE_START else token_id + _SURROGATE_COUNT)


def rouge_tokenize(text: str) -> list[str]:
    """Tokenize like `rouge_score`'s default tokenizer without stemming.

    Args:
        text: Any string.

    Returns:
        The lowercase ASCII alphanumeric tokens, in order (possibly empty for non-English text).
    """
    return _TOKEN_RE.findall(text.lower())


def rouge_l_fmeasure(lcs: int, target_len: int, prediction_len: int) -> float:
    """ROUGE-L F1 from an LCS length, with `rouge_score._score_lcs`'s exact float operations.

    Args:
        lcs: Length of the longest common subsequence of the two token lists.
        target_len: Number of target tokens.
        prediction_len: Number of prediction tokens.

    Returns:
        The F1 in [0, 1]; 0.0 when either side has no tokens or nothing in common. Symmetric in the two
        lengths bit for bit (IEEE products and sums commute), so which side is the "target" never matters.
    """
    if not target_len or not prediction_len:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F1 of two texts, equal to `RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure`.

    One pair at a time; use `RougeLFilter` to compare one text against many.

    Args:
        target: Reference text.
        prediction: Candidate text.

    Returns:
        The F1 in [0, 1].
    """
    target_tokens, prediction_tokens = rouge_tokenize(target), rouge_tokenize(prediction)
    # One character per distinct token makes the string LCS the token LCS (exact, unlike hashing tokens).
    chars = {token: _code_point(index) for index, token in enumerate(dict.fromkeys(target_tokens + prediction_tokens))}
    lcs = LCSseq.similarity("".join(chars[t] for t in target_tokens), "".join(chars[t] for t in prediction_tokens),
                            processor=None)
    return rouge_l_fmeasure(lcs, len(target_tokens), len(prediction_tokens))


class RougeLFilter:
    """An instruction pool that admits a candidate only if no member is a ROUGE-L near-duplicate of it.

    Decisions equal the Self-Instruct reference loop's: `max(rouge_score ROUGE-L F1 against every pool
    member) > threshold` means discard, computed with `RougeScorer(["rougeL"], use_stemmer=False)`.

    How: tokens become single characters, so rapidfuzz's C++ Indel similarity over two code strings is
    1 - (m + n - 2 LCS) / (m + n) = 2 LCS / (m + n), the ROUGE-L F1 in exact arithmetic. It only screens:
    pairs within float noise of the threshold or above it are re-scored with `rouge_score`'s own float
    formula, so ties and rounding (a mathematical 0.7 can round to 0.7000000000000001) decide the same way.

    Complexity per `add`: tokenizing the candidate, O(log pool) to find the members of compatible length
    (the pool is also kept sorted by token length), then one bit-parallel LCS per such member,
    O(ceil(m / 64) * n) word operations for token lengths m and n, all inside one `process.cdist` call.
    Memory: one short string per member, plus the token vocabulary.

    Example:
        >>> pool = RougeLFilter(threshold=0.7)
        >>> pool.add_pool(["Write a poem about the sea."])
        >>> pool.add("Write a poem about the sea!")  # identical tokens: F1 = 1.0
        False
        >>> pool.add("Summarize this article in two sentences.")
        True
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, workers: int = 1):
        """Create an empty pool.

        Args:
            threshold: Discard a candidate whose F1 with some member is strictly above this, in [0, 1].
            workers: Threads rapidfuzz may use per query (-1: all cores); 1 keeps a stage single-threaded.

        Raises:
            ValueError: If the threshold is outside [0, 1].
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"ROUGE-L threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.workers = workers
        # Screening cutoff: below the threshold by far more than float noise (~1e-16), so no pair whose
        # rouge_score F1 could be > threshold is screened out; a wider margin would only re-score more pairs.
        self._cutoff = max(0.0, self.threshold - _SCREEN_MARGIN)
        self._texts: list[str] = []  # pool members in insertion order (max_similarity ties go to the first)
        self._codes: list[str] = []  # the same members, one character per token
        # The members again, sorted by token length (stable), so compatible lengths are one slice.
        self._sorted_codes: list[str] = []
        self._sorted_lengths: list[int] = []
        self._token_chars: dict[str, str] = {}  # token -> its character, in order of first appearance

    def __len__(self) -> int:
        """Number of instructions in the pool (seeds and kept candidates)."""
        return len(self._texts)

    @property
    def pool(self) -> list[str]:
        """A copy of the pool, in insertion order."""
        return list(self._texts)

    def add_pool(self, texts: Iterable[str]) -> None:
        """Add instructions without filtering them (the seed tasks).

        Args:
            texts: Instructions to add as they are, even if they duplicate each other.
        """
        for text in texts:
            self._append(text, self._encode(text))

    def add(self, text: str) -> bool:
        """Add `text` to the pool unless it is a near-duplicate of a member.

        Args:
            text: A candidate instruction.

        Returns:
            True if it was kept (and added), False if discarded (the pool is unchanged); call
            `max_similarity` for the score and the member behind a discard.
        """
        code = self._encode(text)
        if self._exceeds_threshold(code):
            return False
        self._append(text, code)
        return True

    def add_many(self, texts: Iterable[str]) -> list[bool]:
        """`add` each text in order; later texts are filtered against earlier kept ones too.

        Args:
            texts: Candidate instructions.

        Returns:
            One keep decision per text, as `add` would return it.
        """
        return [self.add(text) for text in texts]

    def is_near_duplicate(self, text: str) -> bool:
        """Whether `add(text)` would discard `text`, without changing the pool."""
        return self._exceeds_threshold(self._encode(text))

    def max_similarity(self, text: str) -> tuple[float, str | None]:
        """Highest ROUGE-L F1 of `text` against the pool, and the member that reaches it.

        Screens every member (no length pruning: the maximum may be far below the threshold), then
        re-scores exactly the few within float noise of the best. O(pool) LCS calls.

        Args:
            text: Any string.

        Returns:
            (score, member): the rouge_score F1 and the first member in insertion order that reaches it,
            as `np.argmax` over the reference's score list picks it; (0.0, None) when the pool is empty.
        """
        if not self._texts:
            return 0.0, None
        code = self._encode(text)
        if not code:
            return 0.0, self._texts[0]  # every F1 is 0.0, and argmax picks the first member
        screen = process.cdist([code], self._codes, scorer=Indel.normalized_similarity, processor=None,
                               dtype=np.float64, workers=self.workers)[0]  # (pool,) = 2 LCS / (m + n)
        best_score, best_index = 0.0, 0
        for index in np.flatnonzero(screen >= screen.max() - _SCREEN_MARGIN).tolist():  # ascending order
            score = self._exact_f1(code, self._codes[index])
            if score > best_score:
                best_score, best_index = score, index
        return best_score, self._texts[best_index]

    def _encode(self, text: str) -> str:
        """The rouge tokens of `text` as a string with one character per distinct token."""
        chars = []
        for token in rouge_tokenize(text):
            char = self._token_chars.get(token)
            if char is None:
                char = self._token_chars[token] = _code_point(len(self._token_chars))
            chars.append(char)
        return "".join(chars)

    def _append(self, text: str, code: str) -> None:
        self._texts.append(text)
        self._codes.append(code)
        # O(pool) pointer moves in C: negligible next to the LCS scan every add already does.
        position = bisect.bisect_right(self._sorted_lengths, len(code))
        self._sorted_lengths.insert(position, len(code))
        self._sorted_codes.insert(position, code)

    @staticmethod
    def _exact_f1(code: str, member: str) -> float:
        return rouge_l_fmeasure(LCSseq.similarity(code, member, processor=None), len(code), len(member))

    def _exceeds_threshold(self, code: str) -> bool:
        """Whether some pool member's F1 with the encoded candidate is > threshold."""
        query_len = len(code)
        if not query_len or not self._texts:
            return False  # F1 is 0.0 against everything, and threshold >= 0
        # LCS <= min(m, n) bounds F1 by 2 min(m, n) / (m + n), which exceeds the cutoff c only for
        # c m / (2 - c) < n < m (2 - c) / c; members of other lengths can never be near-duplicates.
        cutoff = self._cutoff
        shortest = math.floor(cutoff * query_len / (2 - cutoff)) + 1
        start = bisect.bisect_left(self._sorted_lengths, max(shortest, 1))  # empty members score 0.0
        if cutoff > 0:
            longest = math.ceil(query_len * (2 - cutoff) / cutoff) - 1
            stop = bisect.bisect_right(self._sorted_lengths, longest)
        else:
            stop = len(self._sorted_lengths)
        if start >= stop:
            return False
        screen = process.cdist([code], self._sorted_codes[start:stop], scorer=Indel.normalized_similarity,
                               processor=None, score_cutoff=cutoff, dtype=np.float64,
                               workers=self.workers)[0]  # (k,), 0.0 where below the cutoff
        # Survivors are rare (near-duplicates only): re-score them with rouge_score's float formula.
        return any(self._exact_f1(code, self._sorted_codes[start + index]) > self.threshold
                   for index in np.flatnonzero(screen).tolist())


class EmbeddingFilter:
    """Optional semantic near-duplicate check: cosine similarity of sentence embeddings, searched with faiss.

    Catches paraphrases that share few words (and so pass ROUGE-L), at the cost of an embedding model; the
    Self-Instruct stage leaves it off by default. Same contract as `RougeLFilter`: `add` keeps a text and adds
    it to the pool unless its cosine similarity with some member is > threshold.

    Complexity: one embedding per text (batched in `add_many`), then an exact inner-product search over the
    pool (`faiss.IndexFlatIP`, O(pool * dim) per query, BLAS-backed). Memory: pool * dim float32.
    """

    def __init__(self, encode: Callable[[list[str]], np.ndarray], threshold: float = DEFAULT_EMBEDDING_THRESHOLD):
        """Create an empty pool around an encoder.

        Args:
            encode: Maps a list of k texts to a float array (k, dim); vectors are L2-normalised here, so
                inner products are cosine similarities. `from_model` builds one from a sentence-transformers model.
            threshold: Discard a text whose cosine similarity with some member is strictly above this, in [-1, 1].

        Raises:
            ValueError: If the threshold is outside [-1, 1].
        """
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"embedding similarity threshold must be in [-1, 1], got {threshold}")
        self.threshold = float(threshold)
        self._encode = encode
        self._texts: list[str] = []
        self._index = None  # faiss.IndexFlatIP, created once the embedding width is known

    @classmethod
    def from_model(cls, model_name_or_path: str = "all-minilm-l6-v2", threshold: float = DEFAULT_EMBEDDING_THRESHOLD,
                   device: str = "cpu", batch_size: int = 64) -> EmbeddingFilter:
        """An `EmbeddingFilter` on a sentence-transformers model (default: the packaged all-MiniLM-L6-v2).

        Args:
            model_name_or_path: `all-minilm-l6-v2`, a local sentence-transformers directory or a hub id.
            threshold: Cosine-similarity threshold (see `__init__`).
            device: Torch device for the encoder.
            batch_size: Texts per forward pass.
        """
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(resolve_embedding_model(model_name_or_path), device=device)
        return cls(lambda texts: model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                              normalize_embeddings=True, show_progress_bar=False), threshold)

    def __len__(self) -> int:
        """Number of texts in the pool."""
        return len(self._texts)

    def add_pool(self, texts: Iterable[str]) -> None:
        """Add texts without filtering them (the seed tasks)."""
        texts = list(texts)
        if texts:
            self._index_add(self._vectors(texts))
            self._texts.extend(texts)

    def add(self, text: str) -> bool:
        """Add `text` unless it is a near-duplicate of a member; True if kept (and added)."""
        return self.add_many([text])[0]

    def add_many(self, texts: Iterable[str]) -> list[bool]:
        """`add` each text in order (encoded in one batch); later texts are checked against earlier kept ones too."""
        texts = list(texts)
        if not texts:
            return []
        vectors = self._vectors(texts)  # (k, dim)
        decisions = []
        for text, vector in zip(texts, vectors, strict=True):
            keep = self._best(vector[None])[0] <= self.threshold
            if keep:
                self._index_add(vector[None])
                self._texts.append(text)
            decisions.append(keep)
        return decisions

    def max_similarity(self, text: str) -> tuple[float, str | None]:
        """Highest cosine similarity of `text` with the pool and the member reaching it; (-1.0, None) if empty."""
        score, index = self._best(self._vectors([text]))
        return score, (self._texts[index] if index >= 0 else None)

    def _vectors(self, texts: list[str]) -> np.ndarray:
        import faiss

        vectors = np.ascontiguousarray(np.asarray(self._encode(texts), dtype=np.float32))  # (k, dim)
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise ValueError(f"encode must return an array (k, dim) for k texts, got shape {vectors.shape}")
        faiss.normalize_L2(vectors)  # in place; a zero vector stays zero (similarity 0 with everything)
        return vectors

    def _index_add(self, vectors: np.ndarray) -> None:
        import faiss

        if self._index is None:
            self._index = faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(vectors)

    def _best(self, vector: np.ndarray) -> tuple[float, int]:
        """(similarity, pool index) of the nearest member to one vector (1, dim); (-1.0, -1) if the pool is empty."""
        if self._index is None or self._index.ntotal == 0:
            return -1.0, -1
        scores, indices = self._index.search(vector, 1)  # (1, 1) each
        return float(scores[0, 0]), int(indices[0, 0])
