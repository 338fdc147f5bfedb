"""align.instruct.dedup: the fast ROUGE-L filter makes exactly the decisions of the rouge_score reference loop."""

from __future__ import annotations

import json
import random
import zlib

import numpy as np
import pytest
from rouge_score import rouge_scorer, tokenize

from align.instruct.dedup import EmbeddingFilter, RougeLFilter, rouge_l, rouge_l_fmeasure, rouge_tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

TRICKY = [
    "",
    "   \t\n ",
    "Hello, World!",
    "It's 3:45pm -- e-mail me at foo@bar.com (ASAP)!!!",
    "COVID-19 cases rose 12.5% in Q3'21; see fig.2a.",
    "MiXeD CaSe and under_scores and snake_case_words",
    "Translate 'the cat' into French: le chat",
    "Écrivez une phrase en français: « déjà vu », café, naïve, Noël.",
    "请把下面的句子翻译成英文。",
    "把 GPT-4 的回答翻译成中文 (2023年)",
    "Напишите короткое стихотворение о море.",
    "Mix of English и русский and 中文 words",
    "Emoji time 🎉🎉 party 🥳 at 9pm 👍",
    "İstanbul straße Ǆemal ﬁle ﬂow",  # Unicode lowercasing and ligatures
    "ＦＵＬＬＷＩＤＴＨ letters and ①②③ digits ٣٤٥",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em-space",
    "a",
    "1 2 3 4 5",
    "--- ... !!! ???",
]

SUBJECTS = ["poem", "story", "email", "summary", "list", "recipe", "essay", "tweet", "joke", "letter", "plan",
            "review", "song", "speech", "riddle", "slogan", "headline", "question", "argument", "dialogue"]
TOPICS = ["the ocean", "climate change", "a rainy day", "machine learning", "your favorite food", "space travel",
          "the history of Rome", "healthy habits", "a job interview", "friendship", "the stock market",
          "electric cars", "time management", "a summer vacation", "learning a new language", "board games"]
VERBS = ["Write", "Compose", "Create", "Draft", "Generate", "Give me", "Come up with", "Produce"]
TEMPLATES = [
    "{verb} a {subject} about {topic}.",
    "{verb} a short {subject} about {topic} for a ten-year-old.",
    "Given the following text about {topic}, {verb_lower} a {subject} that summarizes it.",
    "{verb} a funny {subject} that mentions {topic} and ends with a question.",
    "Explain {topic} in three sentences, then {verb_lower} a {subject} about it.",
    "Is the following statement about {topic} true or false?",
    "Classify the sentiment of this {subject} about {topic} as positive, negative or neutral.",
    "List five facts about {topic}.",
]


def reference_f1(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


def reference_decisions(seeds: list[str], candidates: list[str], threshold: float = 0.7) -> list[bool]:
    """The Self-Instruct loop: score each candidate against every pool member, keep if the max is <= threshold."""
    pool = list(seeds)
    decisions = []
    for candidate in candidates:
        scores = [reference_f1(candidate, member) for member in pool]
        keep = not (scores and max(scores) > threshold)
        decisions.append(keep)
        if keep:
            pool.append(candidate)
    return decisions


def edit(rng: random.Random, text: str) -> str:
    """A near-duplicate: a few word-level edits, case and punctuation changes."""
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["drop", "insert", "swap", "replace", "case"])
        i = rng.randrange(len(words))
        if op == "drop" and len(words) > 2:
            del words[i]
        elif op == "insert":
            words.insert(i, rng.choice(["please", "very", "also", "carefully", "now", "the"]))
        elif op == "swap" and len(words) > 1:
            j = rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        elif op == "replace":
            words[i] = rng.choice(SUBJECTS + ["kind", "nice", "brief"])
        else:
            words[i] = words[i].upper()
    return " ".join(words).rstrip(".") + rng.choice([".", "!", "?", "", " :)"])


def instruction_stream(rng: random.Random, count: int) -> list[str]:
    """Template instructions mixed with near-duplicates of earlier ones and a little non-English text."""
    stream: list[str] = []
    while len(stream) < count:
        roll = rng.random()
        if stream and roll < 0.35:
            stream.append(edit(rng, rng.choice(stream)))
        elif roll < 0.40:
            stream.append(rng.choice(TRICKY))
        else:
            verb = rng.choice(VERBS)
            stream.append(rng.choice(TEMPLATES).format(verb=verb, verb_lower=verb.lower(), subject=rng.choice(SUBJECTS),
                                                       topic=rng.choice(TOPICS)))
    return stream


def word_soup(rng: random.Random, vocab: list[str], max_words: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(0, max_words)))


def test_tokenize_equals_rouge_score_on_tricky_strings():
    """Punctuation, digits, case, Chinese, French, Cyrillic, emoji and odd Unicode tokenize exactly as rouge_score."""
    for text in TRICKY:
        assert rouge_tokenize(text) == tokenize.tokenize(text, None), text
        assert rouge_tokenize(text) == SCORER._tokenizer.tokenize(text), text


def test_tokenize_drops_non_ascii_like_rouge_score():
    """Non-ASCII letters are separators (replicated, not fixed): Chinese vanishes, accents split words."""
    assert rouge_tokenize("请把下面的句子翻译成英文。") == []
    assert rouge_tokenize("Écrivez déjà café") == ["crivez", "d", "j", "caf"]
    assert rouge_tokenize("İstanbul") == tokenize.tokenize("İstanbul", None) == ["i", "stanbul"]


def test_f1_equals_rouge_score_on_many_pairs():
    """rouge_l equals rouge_score's F1 bit for bit: word soups, near-duplicates, paraphrases, identical, empty texts."""
    rng = random.Random(0)
    small_vocab = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "Fast", "1", "2"]
    pairs = [(word_soup(rng, small_vocab, 25), word_soup(rng, small_vocab, 25)) for _ in range(400)]
    stream = instruction_stream(rng, 200)
    pairs += [(text, edit(rng, text)) for text in stream]
    pairs += [(text, text) for text in stream[:50]]
    pairs += [(rng.choice(stream), rng.choice(stream)) for _ in range(300)]
    pairs += [(a, b) for a in TRICKY for b in TRICKY]
    pairs += [("", "Write a poem."), ("Write a poem.", ""), ("", "")]
    for target, prediction in pairs:
        expected = reference_f1(target, prediction)
        assert rouge_l(target, prediction) == pytest.approx(expected, abs=1e-12, rel=0)
        assert rouge_l(target, prediction) == expected, (target, prediction)  # exact, since decisions hinge on it
        pool = RougeLFilter()
        pool.add_pool([prediction])
        assert pool.max_similarity(target)[0] == expected, (target, prediction)


def test_incremental_decisions_equal_reference_loop():
    """An incremental run over 300 instructions keeps and discards exactly what the rouge_score loop does."""
    rng = random.Random(1)
    seeds = instruction_stream(rng, 20)
    candidates = instruction_stream(rng, 300)
    expected = reference_decisions(seeds, candidates)
    pool = RougeLFilter()
    pool.add_pool(seeds)
    assert pool.add_many(candidates) == expected
    assert len(pool) == len(seeds) + sum(expected)
    assert 30 < sum(expected) < 270, "the stream must exercise both keeps and discards"


def test_decisions_equal_reference_at_other_thresholds():
    """The length pruning stays exact at thresholds other than 0.7, including 0 and 1."""
    rng = random.Random(2)
    candidates = instruction_stream(rng, 80)
    for threshold in (0.0, 0.3, 0.5, 0.9, 1.0):
        pool = RougeLFilter(threshold=threshold)
        assert pool.add_many(candidates) == reference_decisions([], candidates, threshold), threshold


def test_threshold_exactly_point_seven_is_kept():
    """A pair whose F1 is exactly 0.7 is kept, because the rule is F1 > 0.7; 8 of 10 tokens is discarded."""
    member = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9"
    at_threshold = "w0 w1 w2 w3 w4 w5 w6 x7 x8 x9"  # LCS 7 of 10 and 10 tokens: F1 = 0.7
    above = "w0 w1 w2 w3 w4 w5 w6 w7 x8 x9"  # LCS 8: F1 = 0.8
    assert reference_f1(at_threshold, member) == 0.7
    pool = RougeLFilter(threshold=0.7)
    pool.add_pool([member])
    assert pool.max_similarity(at_threshold) == (0.7, member)
    assert pool.add(at_threshold) is True
    fresh = RougeLFilter(threshold=0.7)
    fresh.add_pool([member])
    assert fresh.add(above) is False


def test_float_rounding_at_threshold_matches_rouge_score():
    """Pairs whose F1 is 0.7 in exact arithmetic but rounds above or below it decide as rouge_score does."""
    # (target tokens, member tokens, LCS): 2 * LCS / (m + n) = 0.7 exactly; the float F1 is 0.7000000000000001
    # (discarded by the reference) for the first two and 0.6999999999999998 (kept) for the last.
    cases = [(7, 13, 7), (8, 12, 7), (23, 37, 21)]
    for target_len, member_len, lcs in cases:
        member = " ".join(f"w{i}" for i in range(member_len))
        target = " ".join([f"w{i}" for i in range(lcs)] + [f"x{i}" for i in range(target_len - lcs)])
        expected = reference_f1(target, member)
        assert expected != 0.7 and rouge_l_fmeasure(lcs, target_len, member_len) == expected
        pool = RougeLFilter(threshold=0.7)
        pool.add_pool([member])
        assert pool.add(target) is (expected <= 0.7), (target_len, member_len, lcs)


def test_max_similarity_picks_the_float_maximum_among_mathematical_ties():
    """Two members both at F1 = 0.7 in exact arithmetic: the one whose float F1 is larger wins, as in the reference."""
    query = " ".join(f"w{i}" for i in range(21))
    exactly = " ".join([f"w{i}" for i in range(14)] + [f"y{i}" for i in range(5)])  # 19 tokens, LCS 14: 0.7
    rounded_up = " ".join([f"w{i}" for i in range(21)] + [f"z{i}" for i in range(18)])  # 39 tokens, LCS 21
    assert reference_f1(query, exactly) == 0.7 < reference_f1(query, rounded_up)
    pool = RougeLFilter()
    pool.add_pool([exactly, rounded_up])
    assert pool.max_similarity(query) == (reference_f1(query, rounded_up), rounded_up)
    assert pool.add(query) is False


def test_seed_tasks_as_seed_pool(shared_data):
    """With the 175 Self-Instruct seeds as the pool, decisions on seed paraphrases and new tasks equal the reference."""
    lines = (shared_data / "self_instruct" / "seed_tasks.jsonl").read_text().splitlines()
    seeds = [json.loads(line)["instruction"] for line in lines if line.strip()]
    assert len(seeds) == 175
    rng = random.Random(3)
    candidates = [edit(rng, rng.choice(seeds)) for _ in range(60)] + instruction_stream(rng, 40)
    rng.shuffle(candidates)
    pool = RougeLFilter()
    pool.add_pool(seeds)
    assert len(pool) == 175
    assert pool.add_many(candidates) == reference_decisions(seeds, candidates)
    assert pool.is_near_duplicate(seeds[42])  # a seed against itself: F1 = 1.0
    score, most_similar = pool.max_similarity(seeds[42])
    assert score == 1.0 and most_similar == seeds[42]


def test_max_similarity_matches_reference_argmax():
    """max_similarity returns the reference's max score and its first arg-max member, pool order kept."""
    rng = random.Random(4)
    members = instruction_stream(rng, 60) + ["Write a poem about the ocean.", "write a POEM about the ocean!"]
    pool = RougeLFilter()
    pool.add_pool(members)
    for text in instruction_stream(rng, 40) + ["Write a poem about the ocean"]:
        scores = [reference_f1(text, member) for member in members]
        best = max(range(len(members)), key=lambda i: (scores[i], -i))
        assert pool.max_similarity(text) == (scores[best], members[best]), text


def test_pool_behaviour_and_validation():
    """Empty pool keeps anything, discards leave the pool as is, tokenless text is always kept, bad thresholds raise."""
    pool = RougeLFilter()
    assert pool.max_similarity("anything") == (0.0, None)
    assert pool.add("Write a poem about the sea.") is True
    assert pool.add("Write a poem about the sea!") is False
    assert len(pool) == 1 and pool.pool == ["Write a poem about the sea."]
    assert pool.add("请写一首关于大海的诗。") is True  # no rouge tokens: F1 = 0 against everything
    assert pool.add("请写一首关于大海的诗。") is True  # ... so even an exact duplicate is kept, as in the reference
    assert len(pool) == 3
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            RougeLFilter(threshold=bad)


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in encoder: token counts over a hashed 64-dim vocabulary."""
    vectors = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for token in rouge_tokenize(text):
            vectors[row, zlib.crc32(token.encode()) % 64] += 1
    return vectors


def test_embedding_filter_is_incremental_with_cosine_threshold():
    """EmbeddingFilter keeps a text unless its cosine with a member (seeds or earlier kept) is > threshold."""
    pool = EmbeddingFilter(bag_of_words, threshold=0.9)
    pool.add_pool(["write a poem about the sea"])
    decisions = pool.add_many(["sea the about poem a write",  # same bag of words: cosine 1.0
                               "list three facts about volcanoes",
                               "list three facts about volcanoes now",  # cosine 5/sqrt(30) = 0.913 with the previous
                               "summarize the article"])
    assert decisions == [False, True, False, True]
    assert len(pool) == 3
    score, member = pool.max_similarity("list three facts about volcanoes now")
    assert member == "list three facts about volcanoes" and score == pytest.approx(5 / 30**0.5, abs=1e-6)
    assert EmbeddingFilter(bag_of_words).max_similarity("anything") == (-1.0, None)
    with pytest.raises(ValueError, match="threshold"):
        EmbeddingFilter(bag_of_words, threshold=1.5)


def test_embedding_filter_catches_paraphrases_rouge_misses():
    """With all-MiniLM-L6-v2, rewordings that pass ROUGE-L are flagged and a different task is kept."""
    seeds = ["Give me three tips for saving money.", "Translate the sentence below into French."]
    paraphrases = ["What are a few ways to save money?", "How can I put this sentence into French?"]
    rouge = RougeLFilter()
    rouge.add_pool(seeds)
    assert all(not rouge.is_near_duplicate(text) for text in paraphrases)
    embedding = EmbeddingFilter.from_model(threshold=0.8)
    embedding.add_pool(seeds)
    assert embedding.add_many(paraphrases + ["Explain how black holes form."]) == [False, False, True]


def test_large_vocabulary_skips_surrogate_code_points():
    """Token ids past 55,295 skip the UTF-16 surrogate block: codes stay distinct, valid text, and scores exact."""
    vocabulary = " ".join(f"t{i}" for i in range(57_000))
    pool = RougeLFilter()
    pool.add_pool([vocabulary])
    code = pool._encode(vocabulary)
    assert len(set(code)) == 57_000
    code.encode("utf-8")  # raises on a lone surrogate
    window = " ".join(f"t{i}" for i in range(0xD7F0, 0xD810)) + " zz"
    assert pool.max_similarity(window) == (reference_f1(window, vocabulary), vocabulary)
