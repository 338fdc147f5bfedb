"""What a claim asserts beyond its words: quantities with units, dates, who did what to whom, negation,
opposites and qualifiers — and the checks that compare a claim with the passage text it seems to come from.

Word overlap cannot tell "Aster Corp bought Belvan" from "Belvan bought Aster Corp", "5 km" from "5 miles" or
"the oldest bridge" from "a bridge"; it also rejects "5,000 metres" for "5 km" and "aged 51" for "born 1890,
died 1941". These checks read the structure instead, with rules small enough to explain in each verdict:

- `quantities`: numbers (digits, number words, "2.5 million", fractions such as "half") with their unit,
  converted to one base unit per dimension (length, mass, time, volume, area, speed, temperature, power,
  share, currency). A claim's quantity is supported by a passage quantity of the same dimension and value
  (2% tolerance, 10% after "about", "nearly" ...), by the sum or difference of two passage quantities (a
  duration from two years too), and refused with "unit" when only the number matches.
- `dates`: day / month / year in any common order ("14 March 1879", "March 14th, 1879", "3/14/1879",
  "the fourteenth of March 1879"); every part the claim states must be a part of one passage date.
- `binding`: a number (or date) the passages attach to a different name than the claim does — in the
  passage clause holding the number stands another name, in the clause holding the claim's name another
  number — is a swap.
- `roles`: two names on both sides of a word they share with the passage sentence ("acquired", "parent")
  must stand on the same sides there, passive voice ("was acquired by") read as the reverse.
- `polarity`: a claim and its evidence clause must agree on negation ("not", "never", "failed", "no
  longer", "rejected" ...), and a claim may not use one word of an opposite pair (before/after,
  increased/decreased, won/lost ...) where the evidence uses the other.
- `qualifiers`: "only", "first", "always", "mainly", superlatives ("oldest", "best") the passages never use.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# ----------------------------------------------------------------------------- words

_TOKEN = re.compile(r"\d{1,2}(?:st|nd|rd|th)\b|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|"
                    r"[^\W\d_]+(?:['’][^\W\d_]+)?|[$£€%°/]|-")
_CLAUSE_BREAK = re.compile(r"\s*(?:[;:()]|\s+(?:and|but|while|whereas|although|though|because|whilst|yet)\s+)\s*",
                           re.IGNORECASE)


def tokens(text: str) -> list[str]:
    """Words, numbers and the symbols that carry meaning ($, %, °, /), in order."""
    return _TOKEN.findall(text)


def stem(word: str) -> str:
    """A crude stem, enough to match "acquired" with "acquires" and "completed" with "completion"."""
    w = word.lower().replace("’", "'")
    w = re.sub(r"'s$", "", w)
    for suffix in ("ations", "ation", "ments", "ment", "ingly", "ings", "ing", "ied", "ies", "ed", "es", "ly", "s",
                   "e"):
        if len(w) - len(suffix) >= 3 and w.endswith(suffix):
            return w[: -len(suffix)]
    return w


_COARSE_BREAK = re.compile(r"\s*(?:;|\s+(?:but|while|whereas|although|though|because|yet|whilst)\s+)\s*",
                           re.IGNORECASE)


def coarse_clauses(sentence: str) -> list[str]:
    """A sentence cut only where its clauses may differ in polarity (but, while, although, ...)."""
    return [c for c in _COARSE_BREAK.split(sentence) if c and re.search(r"\w", c)]


def clauses(sentence: str) -> list[str]:
    """A sentence cut at semicolons, brackets and conjunctions (and, but, while, ...) — not at commas, which
    more often set off a phrase ("Acme, founded in 1990 by ...") than a new statement."""
    return [c for c in _CLAUSE_BREAK.split(sentence) if c and re.search(r"\w", c)]


# ----------------------------------------------------------------------------- numbers and units

_SMALL = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                     "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
_ORDINALS = {w: i for i, w in enumerate(
    "zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split())}
_ORDINALS.update({"thirtieth": 30, "twenty-first": 21, "twenty-second": 22, "twenty-third": 23, "thirty-first": 31})
_SCALES = {"hundred": 1e2, "thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}
_FRACTIONS = {"half": 0.5, "quarter": 0.25, "third": 1 / 3, "dozen": 12.0}
MONTHS = {m: i + 1 for i, m in enumerate("january february march april may june july august september october "
                                         "november december".split())}
MONTHS.update({m[:3]: i for m, i in list(MONTHS.items())})
MONTHS["sept"] = 9
APPROXIMATE = frozenset("about around approximately roughly nearly almost some over under circa ca approx "
                        "more less than just".split())

# unit word (lower-case, singular) -> (dimension, factor to the base unit, offset added after the factor)
_UNITS: dict[str, tuple[str, float, float]] = {}


def _unit(dimension: str, factor: float, *names: str, offset: float = 0.0) -> None:
    for name in names:
        _UNITS[name] = (dimension, factor, offset)


_unit("length", 1e-3, "mm", "millimetre", "millimeter")
_unit("length", 1e-2, "cm", "centimetre", "centimeter")
_unit("length", 1.0, "m", "metre", "meter", "metres", "meters")
_unit("length", 1e3, "km", "kilometre", "kilometer", "kms")
_unit("length", 0.0254, "inch", "inches")
_unit("length", 0.3048, "foot", "feet", "ft")
_unit("length", 0.9144, "yard", "yd")
_unit("length", 1609.344, "mile", "mi")
_unit("length", 1852.0, "nautical-mile")
_unit("mass", 1e-6, "mg", "milligram")
_unit("mass", 1e-3, "g", "gram", "gramme")
_unit("mass", 1.0, "kg", "kilogram", "kilo", "kilogramme")
_unit("mass", 1e3, "tonne", "ton", "t", "metric-ton")
_unit("mass", 0.45359237, "pound", "lb", "lbs")
_unit("mass", 0.028349523, "ounce", "oz")
_unit("mass", 6.35029318, "stone")
_unit("time", 1.0, "second", "sec", "s")
_unit("time", 60.0, "minute", "min")
_unit("time", 3600.0, "hour", "hr", "h")
_unit("time", 86400.0, "day")
_unit("time", 604800.0, "week")
_unit("time", 1209600.0, "fortnight")
_unit("time", 2629800.0, "month")
_unit("time", 31557600.0, "year", "yr")
_unit("time", 315576000.0, "decade")
_unit("time", 3155760000.0, "century", "centurie")
_unit("volume", 1e-3, "ml", "millilitre", "milliliter")
_unit("volume", 1e-2, "cl", "centilitre", "centiliter")
_unit("volume", 1.0, "l", "litre", "liter")
_unit("volume", 3.785411784, "gallon", "gal")
_unit("volume", 0.473176473, "pint")
_unit("volume", 0.2365882365, "cup")
_unit("volume", 1e3, "cubic-metre", "cubic-meter", "m3", "m³")
_unit("area", 1.0, "square-metre", "square-meter", "m2", "m²", "sq-m")
_unit("area", 1e4, "hectare", "ha")
_unit("area", 4046.8564224, "acre")
_unit("area", 1e6, "square-kilometre", "square-kilometer", "km2", "km²", "sq-km")
_unit("area", 2589988.110336, "square-mile", "sq-mi")
_unit("speed", 1 / 3.6, "km/h", "kph", "kilometre-per-hour", "kilometer-per-hour", "kmh")
_unit("speed", 0.44704, "mph", "mile-per-hour")
_unit("speed", 1.0, "m/s", "metre-per-second", "meter-per-second")
_unit("speed", 0.514444, "knot", "kn")
_unit("temperature", 1.0, "kelvin", "k")
_unit("temperature", 1.0, "celsius", "°c", "degree-celsius", "c", offset=273.15)
_unit("temperature", 5 / 9, "fahrenheit", "°f", "degree-fahrenheit", "f", offset=273.15 - 32 * 5 / 9)
_unit("power", 1.0, "watt", "w")
_unit("power", 1e3, "kilowatt", "kw")
_unit("power", 1e6, "megawatt", "mw")
_unit("power", 1e9, "gigawatt", "gw")
_unit("share", 0.01, "%", "percent", "per-cent", "percentage-point")
_unit("usd", 1.0, "$", "dollar", "usd")
_unit("eur", 1.0, "€", "euro", "eur")
_unit("gbp", 1.0, "£", "gbp", "pound-sterling")
_TWO_WORD = {("nautical", "mile"), ("cubic", "metre"), ("cubic", "meter"), ("square", "metre"), ("square", "meter"),
             ("square", "kilometre"), ("square", "kilometer"), ("square", "mile"), ("metric", "ton"),
             ("degree", "celsius"), ("degree", "fahrenheit"), ("pound", "sterling"), ("per", "cent"),
             ("percentage", "point"), ("sq", "m"), ("sq", "km"), ("sq", "mi")}
_PER = {("kilometre", "hour"), ("kilometer", "hour"), ("mile", "hour"), ("metre", "second"), ("meter", "second")}


def _singular(word: str) -> str:
    w = word.lower()
    if w in _UNITS or len(w) <= 2:
        return w
    for suffix, repl in (("ies", "y"), ("ches", "ch"), ("s", "")):
        if w.endswith(suffix) and (w[: -len(suffix)] + repl) in _UNITS | {"degree": 0, "percentage": 0, "sq": 0,
                                                                         "nautical": 0, "square": 0, "cubic": 0}:
            return w[: -len(suffix)] + repl
    return w


@dataclass(frozen=True)
class Quantity:
    """A number as written (`value`), its dimension (None for a bare number) and its value in the base unit."""

    value: float
    dimension: str | None
    base: float
    text: str
    start: int  # token index, to find the clause that holds it

    @property
    def year_like(self) -> bool:
        return self.dimension is None and float(self.value).is_integer() and 1000 <= self.value <= 2100 \
            and "," not in self.text  # "1,200" is a count


def _number_at(words: list[str], i: int) -> tuple[float, int] | None:
    """(value, tokens used) of a number written at words[i] in digits or words, else None."""
    w = words[i].lower()
    if re.fullmatch(r"[\d,]+(?:\.\d+)?", w):
        value, used = float(w.replace(",", "")), 1
    elif w == "one" and _unit_at(words, i + 1) is None:
        return None  # "no one", "the left one": a pronoun more often than a count
    elif w in _SMALL or w in _TENS:
        value, used = float(_SMALL.get(w, _TENS.get(w, 0))), 1
        if w in _TENS and i + 2 < len(words) and words[i + 1] == "-" and words[i + 2].lower() in _SMALL:
            value, used = value + _SMALL[words[i + 2].lower()], 3
    elif w == "twice":
        return 2.0, 1
    elif w in _FRACTIONS and w != "third":
        value, used = _FRACTIONS[w], 1
    elif w in ("a", "an") and i + 1 < len(words) and words[i + 1].lower() in ("hundred", "thousand", "million",
                                                                              "dozen", "half", "quarter"):
        value, used = 1.0, 1
        if words[i + 1].lower() in _FRACTIONS:
            return _FRACTIONS[words[i + 1].lower()], 2
    else:
        return None
    if i + used < len(words) and words[i + used].lower() in _SCALES:
        value *= _SCALES[words[i + used].lower()]
        used += 1
    return value, used


def _unit_at(words: list[str], i: int) -> tuple[tuple[str, float, float], int] | None:
    """The unit starting at words[i] (one word, two words, or "X per Y"), with the number of tokens used."""
    if i >= len(words):
        return None
    first = _singular(words[i])
    if first == "°" and i + 1 < len(words) and words[i + 1].lower() in ("c", "f"):
        return _UNITS["°" + words[i + 1].lower()], 2
    if first in ("degree", "°") and i + 1 < len(words):
        second = _singular(words[i + 1])
        if second in ("celsius", "fahrenheit", "c", "f"):
            return _UNITS[second if len(second) > 1 else "°" + second], 2
        return None
    if i + 2 < len(words) and words[i + 1].lower() == "per" and (first, _singular(words[i + 2])) in _PER:
        return _UNITS[f"{first}-per-{_singular(words[i + 2])}"], 3
    if i + 2 < len(words) and words[i + 1] == "/" and f"{first}/{words[i + 2].lower()}" in _UNITS:
        return _UNITS[f"{first}/{words[i + 2].lower()}"], 3
    if i + 1 < len(words) and (first, _singular(words[i + 1])) in _TWO_WORD:
        return _UNITS[f"{first}-{_singular(words[i + 1])}"], 2
    if first in _UNITS and (len(first) > 1 or words[i] in ("m", "g", "l", "t", "s", "h", "%")):
        if first in ("c", "f", "k", "w"):  # single letters that are units only after "°" or "degrees"
            return None
        return _UNITS[first], 1
    return None


def quantities(text: str, skip: frozenset[int] = frozenset()) -> list[Quantity]:
    """Every number of the text with its unit if one follows it (or a currency sign precedes it).
    Token positions in `skip` (parts of dates) are left out."""
    words = tokens(text)
    found, i = [], 0
    while i < len(words):
        number = None if i in skip else _number_at(words, i)
        if number is None:
            i += 1
            continue
        value, used = number
        if i > 0 and words[i - 1] == "-" and (i < 2 or not re.fullmatch(r"[\w%]+", words[i - 2])):
            value = -value
        unit = None
        if i > 0 and words[i - 1] in ("$", "£", "€"):
            unit = _UNITS[words[i - 1]]
        else:
            after = _unit_at(words, i + used)
            if after:
                unit, extra = after
                used += extra
        following = words[i + used + 1].lower() if i + used + 1 < len(words) else ""
        if unit is None and (words[i].lower() == "twice" or (
                i + used < len(words) and words[i + used].lower() == "times"
                and (following in ("as", "more", "less", "the") or following.endswith("er")))):
            used += words[i].lower() != "twice"
            unit = ("ratio", 1.0, 0.0)  # "four times as much", "twice as long" (not "won 71 times")
        if unit is None and i + used + 1 < len(words) and words[i + used].lower() in ("and", "to", "-", "or"):
            ahead = _number_at(words, i + used + 1)  # "between 6,000 and 9,000 milligrams": the unit comes last
            after = _unit_at(words, i + used + 1 + ahead[1]) if ahead else None
            if after:
                unit = after[0]
        if unit is None and words[i + used - 1].lower() in ("half", "quarter"):
            unit = _UNITS["%"][0], 1.0, 0.0  # "half of the members" is a share, like "50%"
        dimension, factor, offset = unit if unit else (None, 1.0, 0.0)
        text_span = " ".join(words[i:i + used])
        found.append(Quantity(value, dimension, value * factor + offset, text_span, i))
        i += used
    return found


def neighbourhood(words: list[str], start: int, end: int, stopwords: frozenset[str]) -> tuple[dict, dict]:
    """Content-word stems just before and just after words[start:end] (up to 4 tokens each way, stopping at
    another number), weighted 2 for names and 1 otherwise: what a number in a sentence is about."""

    def side(indices):
        weights = {}
        for k in indices:
            w = words[k]
            if _number_at(words, k) is not None or re.fullmatch(r"[\d,.]+", w):
                break
            if w.isalpha() and w.lower() not in stopwords and len(w) > 2:
                weights[stem(w)] = max(weights.get(stem(w), 0), 2 if w[:1].isupper() else 1)
        return weights

    return side(range(start - 1, max(-1, start - 5), -1)), side(range(end, min(len(words), end + 4)))


def _close(a: float, b: float, tolerance: float) -> bool:
    return math.isclose(a, b, rel_tol=tolerance, abs_tol=1e-9)


@dataclass(frozen=True)
class QuantityMatch:
    supported: bool
    how: str  # "equal", "converted", "computed", "unit" (number right, unit wrong), "missing"
    passage_text: str | None = None


def match_quantity(claim: Quantity, passage: list[Quantity], approximate: bool,
                   arithmetic: bool = True) -> QuantityMatch:
    """Is a claim's quantity one of the passage's (maybe in another unit), or (with `arithmetic`) the sum or
    difference of two of them — a duration between two years, a year plus a duration included?"""
    tolerance = 0.10 if approximate else 0.02
    for p in passage:
        if claim.dimension is None and _close(claim.value, p.value, 1e-9):
            return QuantityMatch(True, "equal", p.text)  # "330" for "330 metres": the unit is just left out
        if claim.dimension and claim.dimension == p.dimension and _close(claim.base, p.base, tolerance):
            return QuantityMatch(True, "equal" if _close(claim.value, p.value, 1e-9) else "converted", p.text)
    if claim.dimension:
        same_number = [p for p in passage if p.dimension and _close(claim.value, p.value, 1e-9)]
        if same_number:
            return QuantityMatch(False, "unit", same_number[0].text)
    if arithmetic:
        for a_index, a in enumerate(passage):
            for b in passage[a_index + 1:]:
                if any(claim.dimension == dimension and _close(claim.base, value, tolerance if dimension else 1e-9)
                       for dimension, value in _combinations(a, b, claim.year_like)):
                    return QuantityMatch(True, "computed", f"{a.text}, {b.text}")
    return QuantityMatch(False, "missing")


def _combinations(a: Quantity, b: Quantity, want_year: bool) -> list[tuple[str | None, float]]:
    """(dimension, value) of the sum and difference of two quantities that can be added."""
    year = _UNITS["year"][1]
    if a.year_like and b.year_like:
        span = abs(a.value - b.value)
        return [(None, span), ("time", span * year)]
    if a.year_like or b.year_like:
        start, step = (a, b) if a.year_like else (b, a)
        if not want_year or step.dimension not in (None, "time"):
            return []
        step_years = step.base / year if step.dimension else step.value
        return [(None, start.value + step_years), (None, start.value - step_years)]
    if a.dimension != b.dimension:
        return []
    x, y = (a.base, b.base) if a.dimension else (a.value, b.value)
    ratios = [("ratio", x / y)] if y else []
    ratios += [("ratio", y / x)] if x else []
    return [(a.dimension, x + y), (a.dimension, abs(x - y)), *ratios]


# ----------------------------------------------------------------------------- dates


@dataclass(frozen=True)
class Date:
    year: int | None
    month: int | None
    day: int | None
    text: str
    positions: frozenset[int]  # token indices it covers


def _day(word: str) -> int | None:
    w = word.lower()
    m = re.fullmatch(r"(\d{1,2})(?:st|nd|rd|th)?", w)
    if m and 1 <= int(m.group(1)) <= 31:
        return int(m.group(1))
    return _ORDINALS.get(w) if _ORDINALS.get(w, 0) >= 1 else None


def _year(word: str) -> int | None:
    return int(word) if re.fullmatch(r"\d{3,4}", word) else None


def dates(text: str) -> list[Date]:
    """Dates with a month name ("14 March 1879", "March 14th, 1879", "the 14th of March", "March 1879") and
    numeric ones ("3/14/1879", "1879-03-14"; day/month order read from values > 12, else both kept)."""
    words = tokens(text)
    found: list[Date] = []
    used: set[int] = set()

    def add(year, month, day, span):
        positions = frozenset(span)
        if not positions & used:
            used.update(positions)
            found.append(Date(year, month, day, " ".join(words[min(span):max(span) + 1]), positions))

    for i, w in enumerate(words):
        month = MONTHS.get(w.lower().rstrip("."))
        if month is None or (w.lower() == "may" and not (i + 1 < len(words) and (_day(words[i + 1])
                                                                                 or _year(words[i + 1])))
                             and not (i > 0 and _day(words[i - 1]))):
            continue
        span, day, year = [i], None, None
        j = i + 1
        if j < len(words) and _day(words[j]) and not _year(words[j]):
            day, span = _day(words[j]), span + [j]
            j += 1
        if j < len(words) and words[j] == "," and j + 1 < len(words):
            j += 1
        if j < len(words) and _year(words[j]):
            year, span = _year(words[j]), span + [j]
        if day is None:  # "14 March", "14th of March", "the fourteenth of March"
            k = i - 1
            if k >= 0 and words[k].lower() == "of":
                k -= 1
            if k >= 0 and _day(words[k]) and not _year(words[k]):
                day, span = _day(words[k]), span + [k]
        add(year, month, day, span)
    joined = " ".join(words)
    for m in re.finditer(r"\b(\d{1,4}) / (\d{1,2}) / (\d{2,4})\b|\b(\d{4}) - (\d{1,2}) - (\d{1,2})\b", joined):
        start = len(joined[:m.start()].split())
        span = list(range(start, start + 5))
        if m.group(4):
            add(int(m.group(4)), int(m.group(5)), int(m.group(6)), span)
            continue
        a, b, y = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if a > 12 >= b:
            add(y, b, a, span)
        elif b > 12 >= a:
            add(y, a, b, span)
        else:  # ambiguous: both readings
            add(y, a, b, span)
            found.append(Date(y, b, a, found[-1].text, frozenset(span)))
    return found


def date_supported(claim: Date, passage: list[Date], passage_years: set[int]) -> bool:
    """Every part the claim states is the same part of one passage date (a year alone may be a bare number)."""
    for p in passage:
        if all(c is None or c == q for c, q in ((claim.year, p.year), (claim.month, p.month), (claim.day, p.day))):
            return True
    return claim.month is None and claim.day is None and claim.year in passage_years


# ----------------------------------------------------------------------------- names, roles, polarity

_LOWER_NAME_WORDS = frozenset("of the de da van von la le del di and for".split())


def name_spans(sentence: str, openers: frozenset[str], stopwords: frozenset[str]) -> list[tuple[int, str]]:
    """(token index, lower-cased name) for runs of capitalised words ("Aster Corp", "Gulf of Aden")."""
    words = tokens(sentence)
    spans, i = [], 0
    while i < len(words):
        w = words[i]
        if w[:1].isupper() and w.lower() not in MONTHS and not (w.lower() in openers or w.lower() in stopwords):
            j = i + 1
            while j < len(words) and (words[j][:1].isupper() or (words[j].lower() in _LOWER_NAME_WORDS and j + 1
                                      < len(words) and words[j + 1][:1].isupper())):
                j += 1
            spans.append((i, " ".join(x.lower() for x in words[i:j] if x.lower() not in _LOWER_NAME_WORDS)))
            i = j
        else:
            i += 1
    return spans


NEGATIONS = frozenset("not n't never no none nobody nothing neither nor without cannot failed fail fails unable "
                      "refused refuse declined rejected denied lacked lacks lack absent abandoned cancelled canceled "
                      "unsuccessful".split())
_OPPOSITES = [("before", "after"), ("earlier", "later"), ("preceded", "followed"), ("increased", "decreased"),
              ("increase", "decrease"), ("rose", "fell"), ("rise", "fall"), ("more", "fewer"), ("more", "less"),
              ("larger", "smaller"), ("bigger", "smaller"), ("higher", "lower"), ("older", "younger"),
              ("oldest", "youngest"), ("largest", "smallest"), ("longest", "shortest"), ("highest", "lowest"),
              ("north", "south"), ("east", "west"), ("northern", "southern"), ("eastern", "western"), ("won", "lost"),
              ("win", "lose"), ("above", "below"), ("inside", "outside"), ("opened", "closed"), ("joined", "left"),
              ("began", "ended"), ("start", "end"), ("started", "ended"), ("maximum", "minimum"), ("gained", "lost"),
              ("warmer", "colder"), ("hotter", "colder"), ("heavier", "lighter"), ("faster", "slower"),
              ("import", "export"), ("imported", "exported"), ("imports", "exports"), ("bought", "sold"),
              ("buy", "sell"), ("born", "died"), ("upstream", "downstream"), ("predecessor", "successor"),
              ("first", "last"), ("beginning", "end"), ("entered", "left"), ("arrived", "departed"),
              ("expanded", "shrank"), ("cheaper", "dearer"), ("minority", "majority"), ("surplus", "deficit"),
              ("ancestor", "descendant"), ("rural", "urban"), ("private", "public"), ("male", "female"),
              ("men", "women"), ("morning", "evening"), ("dawn", "dusk"), ("summer", "winter"),
              ("spring", "autumn"), ("wet", "dry"), ("hot", "cold"), ("left", "right"), ("accepted", "rejected"),
              ("approved", "rejected"), ("allowed", "banned"), ("legal", "illegal"),
              ("permitted", "banned"), ("permitted", "prohibited"), ("permitted", "forbidden"),
              ("allowed", "prohibited"),
              ("allowed", "forbidden"), ("win", "lost"), ("success", "failure"), ("succeeded", "failed"),
              ("survived", "died"), ("alive", "dead"), ("open", "shut"), ("full", "empty"), ("ahead", "behind"),
              ("youngest", "eldest"), ("younger", "elder"), ("oldest", "newest"), ("older", "newer")]
OPPOSITE: dict[str, set[str]] = {}
for _a, _b in _OPPOSITES:
    OPPOSITE.setdefault(_a, set()).add(_b)
    OPPOSITE.setdefault(_b, set()).add(_a)
_ENDED = frozenset("closed retired demolished abandoned discontinued ceased shut defunct former formerly dissolved "
                   "disbanded decommissioned scrapped destroyed extinct until".split())
_ONGOING = frozenset("still currently today remains remain continues continue ongoing active".split())
QUALIFIERS = frozenset("only first sole solely single unique exclusively entirely completely fully always every all "
                       "mainly mostly primarily largely chiefly predominantly officially permanently record ever "
                       "most best worst leading famous renowned popular major biggest largest oldest newest "
                       "earliest latest greatest highest tallest longest fastest richest youngest smallest "
                       "never".split())
_NOT_SUPERLATIVE = frozenset("interest forest harvest request contest protest suggest honest modest west test rest "
                             "nest guest quest chest arrest invest manifest digest priest earnest conquest inquest "
                             "midwest southwest northwest tempest behest lest pest zest vest crest jest fest infest "
                             "attest detest divest wrest ingest congest molest celest".split())
_BE = frozenset("is are was were be been being has have had got gets get".split())


TIME_ORDER = {"before": -1, "earlier": -1, "prior": -1, "preceded": -1, "after": 1, "later": 1, "following": 1,
              "followed": 1}


_VERBS = frozenset("""
gave give gives bought buy buys taught teach teaches beat beats sold sell sells won win wins led lead leads own owns
ran run runs made make makes took take takes sent send sends told tell tells built build builds wrote write writes
met meet meets left leave leaves fed feed feeds paid pay pays sue sues train trains hire hires employ employs
follow follows precede precedes replace replaces defeat defeats marry marries succeed succeeds join joins help helps
fund funds host hosts visit visits invite invites chose choose chooses named name names bore bear bears fought fight
fights lent lend lends owes owe sang sing sings struck strike strikes drew draw draws caught catch catches
acquire acquires absorb absorbs overtake overtook overtakes outsold outsell outsells outran outrun
""".split())


def is_predicate(word: str) -> bool:
    """A word that can carry "who did what to whom": a lower-case verb form (past tense in -ed, or a common
    verb), not a name."""
    w = word.lower()
    return not word[:1].isupper() and (w in _VERBS or (w.endswith("ed") and len(w) > 4))


def is_number_word(word: str) -> bool:
    w = word.lower()
    return w in _SMALL or w in _TENS or w in _SCALES or w in _FRACTIONS or w in _ORDINALS or w.isdigit()


def is_qualifier(word: str) -> bool:
    w = word.lower()
    if w in QUALIFIERS:
        return True
    return len(w) > 5 and w.endswith("est") and w not in _NOT_SUPERLATIVE and not word[:1].isupper()


def negated(clause_words: list[str]) -> bool:
    lowered = [w.lower().replace("’", "'") for w in clause_words]
    return any(w in NEGATIONS or w.endswith("n't") for w in lowered) or "no longer" in " ".join(lowered)


def roles(words: list[str], verb_index: int, left: int, right: int) -> tuple[int, int]:
    """(agent, patient) token indices of two anchors on both sides of a predicate word; a passive predicate
    ("was bought by", "is owned by") puts the agent after it."""
    before = [w.lower() for w in words[max(0, verb_index - 3):verb_index]]
    after = [w.lower() for w in words[verb_index + 1:verb_index + 3]]
    passive = "by" in after and any(w in _BE for w in before)
    return (right, left) if passive else (left, right)


def side_agreement(claim: list[str], sentence: list[str], stopwords: frozenset[str]) -> tuple[int, int, str] | None:
    """(claim words moved left to right, moved right to left, predicate) around the predicate word the claim
    shares with the sentence that most words of both surround, or None without such a word. A passive
    predicate ("was bought by") swaps its sides first. A swap of parties moves words both ways; moving a
    phrase ("Under the treaty, ..." to the end) moves them one way only."""

    def content(words):
        return [(k, stem(w)) for k, w in enumerate(words)
                if w.isalpha() and len(w) > 2 and w.lower() not in stopwords and w.lower() not in _BE]

    def sides(words, items, at):
        left = {s for k, s in items if k < at}
        right = {s for k, s in items if k > at}
        before = [w.lower() for w in words[max(0, at - 3):at]]
        after = [w.lower() for w in words[at + 1:at + 3]]
        if "by" in after and any(w in _BE for w in before):
            left, right = right, left
        return left - right, right - left

    claim_items, sentence_items = content(claim), content(sentence)
    claim_count, sentence_count = {}, {}
    for _, s in claim_items:
        claim_count[s] = claim_count.get(s, 0) + 1
    for _, s in sentence_items:
        sentence_count[s] = sentence_count.get(s, 0) + 1
    best = None
    for k, s in claim_items:
        if not is_predicate(claim[k]) or claim_count[s] != 1 or sentence_count.get(s) != 1:
            continue
        at = next(j for j, t in sentence_items if t == s)
        left_c, right_c = sides(claim, claim_items, k)
        if not left_c or not right_c:
            continue
        left_s, right_s = sides(sentence, sentence_items, at)
        kept = len(left_c & left_s) + len(right_c & right_s)
        rightward, leftward = len(left_c & right_s), len(right_c & left_s)
        if best is None or kept + rightward + leftward > best[0]:
            best = (kept + rightward + leftward, rightward, leftward, claim[k].lower())
    return best[1:] if best else None
