"""Lexical guards for the semantic response cache: catch the near-misses embeddings miss. PURE.

Embeddings score an edit that changes the answer almost as high as a paraphrase ("12 times 7"
vs "12 times 8": 0.95, "enable 2FA" vs "disable 2FA": 0.97). `guard` names the first check
that tells two user messages apart; None leaves the decision to the similarity threshold.

- ``numbers``: the multisets of numbers differ (digits, decimals, thousands commas, "2 million",
  number words and ordinals: "twelve" = 12, "twice" = 2), a unit of measure is in one message
  only (km, cups, GB, °F, %), or a number carries other time units ("2 days"/"2 weeks",
  "9am"/"9pm"). The value 1 is ignored: "one" is also a pronoun, and "a cup" is "one cup".
- ``negation``: negation cues (not, never, without, n't, ...; a few in fr/es/de/pt/it) differ
  in presence or parity, or one message has more of a word and fewer of its antonym than the
  other ("enable"/"disable", "turn on"/"disable", "before"/"after").
- ``entities``: a named term of one message is not a word of the other. Named: capitalised
  words not at a sentence start, acronyms, inner capitals or digits (iPhone15, GPT-4), and a
  lowercase vocabulary of languages, technologies, countries, big cities and currencies.
- ``language``: both messages are confidently detected (script, then stopwords for en, fr, es,
  de, pt, it) and differ.

Blind spots: lowercase names outside the vocabulary ("ibuprofen"/"acetaminophen"), swapped
direction ("km to miles"/"miles to km"), phrasal antonyms ("log in"/"log out", "zoom in"/"zoom
out"), a moved negation, and the value 1 ("1 egg"/"eggs"). Paraphrases are wrongly rejected
when one adds a named term ("the largest ocean"/"... on Earth") or says a negation positively
("without roaming charges"/"avoid roaming charges"). Questions that share every term ("boil"
vs "poach" an egg) are left to the threshold. A non-Latin script maps to one language
(Cyrillic is "ru").
"""

from __future__ import annotations

import re
import unicodedata

_TOKEN = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?|[^\W\d_]+(?:['-][^\W\d_]+)*|[%°$€£¥]")
_TERM = re.compile(r"(?<![\w°])[^\W\d_](?:\w|[-.'+#](?=\w))*(?:\+\+|#)?")
_PARTS = re.compile(r"[-.'/]")
_OPENERS = " \t\"'([{¿¡*-•#>“‘«"


def _words(text: str) -> list[str]:
    """Split a whitespace-separated word list (the tables below read better as prose)."""
    return text.split()


_SMALL = {w: i for i, w in enumerate(_words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"))}
_TENS = {w: 10 * i for i, w in enumerate(_words("thirty forty fifty sixty seventy eighty ninety"), 3)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
_STANDALONE = {w: i for i, w in enumerate(
    _words("first second third fourth fifth sixth seventh eighth ninth tenth"), 1)}
_STANDALONE.update(once=1, twice=2, thrice=3, dozen=12, squared=2, cubed=3)


def _table(spec: str) -> dict[str, str]:
    """Read ``canonical: alias alias; ...`` into {alias: canonical} (the canonical included)."""
    table = {}
    for entry in spec.split(";"):
        canonical, _, aliases = entry.partition(":")
        for alias in [canonical, *aliases.split()]:
            table[alias.strip()] = canonical.strip()
    return table


# Units of measure count wherever they occur; time units only right after a number.
_UNITS = _table(
    "km: kilometer kilometers kilometre kilometres; mile: mi miles; m: meter meters metre metres;"
    "cm: centimeter centimeters centimetre centimetres; mm: millimeter millimeters; ft: foot feet;"
    "inch: inches; yard: yards yd; kg: kilo kilos kilogram kilograms; g: gram grams;"
    "mg: milligram milligrams; lb: lbs pound pounds; oz: ounce ounces; tonne: tonnes;"
    "liter: liters litre litres; ml: milliliter milliliters millilitre millilitres;"
    "gallon: gallons gal; cup: cups; tbsp: tablespoon tablespoons; tsp: teaspoon teaspoons;"
    "celsius: centigrade; fahrenheit:; kelvin:; percent: % percentage; mph:; kcal: calorie calories;"
    "kb: kilobyte kilobytes; mb: megabyte megabytes; gb: gigabyte gigabytes; tb: terabyte terabytes")
_TIME_UNITS = _table(
    "second: seconds sec secs; minute: minutes min mins; hour: hours hr hrs h; day: days;"
    "week: weeks; month: months; year: years yr yrs; decade: decades; am:; pm:")
_VOCAB = _table(
    "english:; french:; spanish:; german:; italian:; portuguese:; japanese:; chinese: mandarin;"
    "korean:; russian:; arabic:; hindi:; dutch:; swedish:; polish:; turkish:; greek:;"
    "python:; rust:; java:; javascript: js; typescript:; kotlin:; go: golang; c++: cpp;"
    "c#: csharp; ruby:; php:; perl:; scala:; haskell:; elixir:; lua:; dart:; bash:; powershell:;"
    "sql:; html:; css:; node: nodejs node.js; django:; flask:; rails:; pandas:; numpy:;"
    "pytorch:; tensorflow:; kubernetes: k8s; docker:; postgres: postgresql psql; mysql:;"
    "sqlite:; mongodb: mongo; redis:; kafka:; nginx:; apache:; linux:; ubuntu:; debian:;"
    "fedora:; windows:; macos: osx; ios:; android:; aws:; azure:; gcp:; git:; github:; excel:;"
    "chrome:; firefox:; safari:; america:; canada:; mexico:; brazil:; argentina:; uk: britain;"
    "england:; ireland:; france:; germany:; spain:; portugal:; italy:; netherlands: holland;"
    "belgium:; switzerland:; austria:; sweden:; norway:; denmark:; finland:; iceland:;"
    "poland:; greece:; russia:; ukraine:; china:; japan:; korea:; india:; thailand:; vietnam:;"
    "australia:; egypt:; paris:; london:; rome:; berlin:; madrid:; lisbon:; tokyo:;"
    "euro: euros eur €; dollar: dollars usd $; yen: jpy ¥; gbp: £ sterling; rupee: rupees;"
    "yuan:; peso: pesos; franc: francs; bitcoin: btc")
_COMMON_CAPS = frozenset(_words("i i'm i've i'd i'll ok okay"))

_NEGATIONS = frozenset(_words(
    "not no never none nothing nobody nowhere neither nor without cannot dont doesnt didnt "
    "isnt arent wasnt werent cant couldnt shouldnt wouldnt wont havent hasnt hadnt mustnt "
    "pas jamais rien sans aucun aucune nunca sin nada ningún ninguna ninguno tampoco "
    "nicht nichts kein keine keinen keinem keiner nie niemals ohne "
    "não sem nenhum nenhuma non mai senza niente nessun nessuno nessuna"))
# Word/antonym pairs; "|" joins words on one side (irregular forms, shared polarity).
_ANTONYMS = (
    "enable|activate|on/disable|deactivate|off add/remove|delete|subtract increase|raise/"
    "decrease|reduce|lower before/after max|maximum|maximize/min|minimum|minimize open/close "
    "start|begin/stop|end allow/deny|block|disallow grant/revoke encrypt/decrypt encode/decode "
    "upload/download import/export buy|bought/sell|sold send/receive more/less|fewer "
    "higher/lower highest/lowest high/low true/false lock/unlock install/uninstall "
    "include/exclude accept/reject push/pull show/hide connect/disconnect mount/unmount "
    "subscribe/unsubscribe login/logout compress|zip/decompress|unzip serialize/deserialize "
    "merge/split backward|backwards/forward|forwards inside/outside above/below "
    "ascending|asc/descending|desc uppercase|upper/lowercase|lower public/private "
    "good/bad best/worst better/worse advantage|pros/disadvantage|cons like/dislike "
    "agree/disagree fast/slow long/short early/late first/last hot/cold warm/cool "
    "safe/unsafe|dangerous valid/invalid possible/impossible legal/illegal healthy/unhealthy "
    "visible/invisible online/offline local/remote sync|synchronous/async|asynchronous "
    "input/output inner/outer horizontal/vertical left/right up/down win|won|gain/lose|lost "
    "profit|gain/loss rise/fall positive/negative above/below over/under inside/outside "
    "north/south east/west success/failure pass/fail read/write light/dark large|big/small "
    "cheap/expensive inbound|incoming|ingress/outbound|outgoing|egress enter/exit "
    "attach/detach expand/collapse")


def _forms(word: str) -> frozenset[str]:
    """Return the word with its regular inflections (-s, -ed, -ing, -er, -est, doubled)."""
    if len(word) <= 2:
        return frozenset({word})
    stem = word[:-1] if word.endswith("e") else word
    forms = {word, word + "s", word + "es", stem + "ed", stem + "ing", stem + "er", stem + "est"}
    if word[-1] not in "aeiouwxy" and word[-2] in "aeiou":
        forms |= {word + word[-1] + suffix for suffix in ("ed", "ing", "er", "est")}
    return frozenset(forms)


_ANTONYM_PAIRS = tuple(
    tuple(frozenset().union(*map(_forms, side.split("|"))) for side in pair.split("/"))
    for pair in _ANTONYMS.split())

_STOPWORDS = {lang: frozenset(words.split()) for lang, words in {
    "en": "the a an is are was were be been to of and in on for with how what why when where "
          "which who do does did i you my your it this that can should would could from at by "
          "or there have has me we get make use between about into than some any many much "
          "best way if will they them our its",
    "fr": "le la les un une des du de est sont et en dans pour avec comment quel quelle quels "
          "quelles pourquoi quand où qui que qu'est-ce je tu vous mon ma mes votre vos ce "
          "cette ces peut puis faire pas sur au aux il elle nous entre plus très ou faut ça "
          "combien l' d' qu' c' n' j' s' est-ce",
    "es": "el la los las un una unos unas es son y en para por con cómo como qué cuál cuáles "
          "cuándo dónde quién yo tú mi mis tu su sus este esta estos puedo puede hacer del al "
          "lo se entre más muy hay está necesito de que",
    "de": "der die das den dem des ein eine einen einem einer ist sind und in für mit wie was "
          "warum wann wo welche welcher welches wer ich du sie mein meine ihr dein kann kannst "
          "können machen nicht auf zu von im zwischen mehr sehr es man auch ohne mir mich",
    "pt": "o os a as um uma é são e em no na nos nas para por com como qual quais quando onde "
          "quem eu você meu minha seu sua este esta isso posso pode fazer do da dos das ao "
          "aos não entre mais muito tem numa num devo estou também de que se",
    "it": "il lo la i gli le un uno una è sono e in per con come quale quali perché quando "
          "dove chi io tu mio mia tuo suo questo questa posso può fare del della dei delle "
          "al alla nel nella non tra fra più molto ci di che qual si l' dell' sull' un' all' nell'",
}.items()}
_MARKS = {"es": "ñ¿¡", "pt": "ãõç", "de": "ßäöü", "fr": "çêâîôûœëï", "it": "ìò"}
_SCRIPTS = {"CYRILLIC": "ru", "GREEK": "el", "ARABIC": "ar", "HEBREW": "he", "DEVANAGARI": "hi",
            "THAI": "th", "HANGUL": "ko", "HIRAGANA": "ja", "KATAKANA": "ja", "CJK": "zh"}


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).replace("’", "'").replace("‘", "'")


def _tokens(text: str, split: bool = False) -> list[str]:
    """Lowercase tokens; `split` breaks hyphenated words ("twenty-five", "8-week-old")."""
    tokens = _TOKEN.findall(_normalise(text).lower())
    return [p for t in tokens for p in t.split("-")] if split else tokens


def _quantities(tokens: list[str]) -> list[tuple[str, float, int]]:
    """Return (key, value, index after it) per number; the key keeps "3.10" apart from "3.1"."""
    found: list[tuple[str, float, int]] = []
    i = 0
    while i < len(tokens):
        tok, nxt = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
        literal = tok[0].isdecimal()
        if not (literal or tok in _SMALL or tok in _TENS or tok in _SCALES
                or (tok in ("a", "an") and nxt in _SCALES)):
            # An ordinal right after a number is a unit: "30 second".
            if tok in _STANDALONE and not (tok in _TIME_UNITS and found and found[-1][2] == i):
                found.append((str(_STANDALONE[tok]), float(_STANDALONE[tok]), i + 1))
            i += 1
            continue
        # "a hundred" and a bare "thousand" scale 1: the loop below applies the scale word.
        current = float(tok.replace(",", "")) if literal else float(
            _SMALL.get(tok, _TENS.get(tok, 1)))
        total, scaled, i = 0.0, False, i if tok in _SCALES else i + 1
        while i < len(tokens):
            tok, nxt = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
            if tok in _SCALES:
                scaled = True
                if _SCALES[tok] == 100:
                    current *= 100
                else:
                    total, current = total + current * _SCALES[tok], 0.0
            elif not literal and (tok in _SMALL or tok in _TENS):
                current += _SMALL.get(tok, _TENS.get(tok, 0))
            elif not (tok == "and" and nxt in _SMALL):
                break
            i += 1
        value = total + current
        if literal and not scaled:
            key = tokens[i - 1].replace(",", "")
        else:
            key = str(int(value)) if value == int(value) else repr(value)
        found.append((key, value, i))
    return found


def numbers(text: str) -> tuple[float, ...]:
    """Return the numbers in `text`, sorted: digits, spelled-out numbers, ordinals."""
    return tuple(sorted(value for _, value, _ in _quantities(_tokens(text, split=True))))


def _numeric_facts(text: str) -> tuple[list[str], set[str], dict[str, set[str]]]:
    """Return the number keys (1 left out), the units of measure, the time units per number."""
    tokens = _tokens(text, split=True)
    quantities = _quantities(tokens)
    # A one-letter unit ("m", "g") counts only after a number: not "e.g." or "5G".
    units = {_UNITS[t] for i, t in enumerate(tokens)
             if t in _UNITS and (len(t) > 1 or (i and tokens[i - 1][0].isdecimal()))}
    units |= {"celsius" if b == "c" else "fahrenheit"
              for a, b in zip(tokens, tokens[1:], strict=False) if a == "°" and b in ("c", "f")}
    anchors = [(key, end) for key, _, end in quantities]
    anchors += [("1", i + 1) for i, t in enumerate(tokens) if t in ("a", "an", "per", "every")]
    timed: dict[str, set[str]] = {}
    for key, end in anchors:
        if end < len(tokens) and tokens[end] in _TIME_UNITS:
            timed.setdefault(key, set()).add(_TIME_UNITS[tokens[end]])
    return sorted(key for key, value, _ in quantities if value != 1), units, timed


def _numbers_differ(a: str, b: str) -> bool:
    (keys_a, units_a, timed_a), (keys_b, units_b, timed_b) = _numeric_facts(a), _numeric_facts(b)
    return keys_a != keys_b or units_a != units_b or any(
        timed_a[k] != timed_b[k] for k in timed_a.keys() & timed_b.keys())


def _negation_differs(a: str, b: str) -> bool:
    words_a, words_b = _tokens(a), _tokens(b)
    cues_a, cues_b = (sum(w in _NEGATIONS or w.endswith("n't") for w in ws)
                      for ws in (words_a, words_b))
    if (cues_a > 0) != (cues_b > 0) or cues_a % 2 != cues_b % 2:
        return True
    for left, right in _ANTONYM_PAIRS:
        more_left = sum(w in left for w in words_a) - sum(w in left for w in words_b)
        more_right = sum(w in right for w in words_a) - sum(w in right for w in words_b)
        if more_left * more_right < 0:
            return True
    # Phrasal opposites: the same verb with opposite particles ("log in" / "log out").
    verbs_a, verbs_b = _phrasal(words_a), _phrasal(words_b)
    return any(verbs_a[k] * verbs_b.get(k, 0) < 0 for k in verbs_a)


# Particle -> (axis, direction): "zoom in" and "zoom out" lie on one axis, opposite ways.
_PARTICLES = {"in": ("in", 1), "into": ("in", 1), "out": ("in", -1), "on": ("on", 1),
              "off": ("on", -1), "up": ("up", 1), "down": ("up", -1)}


def _phrasal(words: list[str]) -> dict[tuple[str, str], int]:
    """(word, axis) -> the sum of its particles' directions, for word + particle pairs."""
    found: dict[tuple[str, str], int] = {}
    for word, particle in zip(words, words[1:], strict=False):
        if particle in _PARTICLES and word.isalpha() and word not in _PARTICLES:
            axis, sign = _PARTICLES[particle]
            found[(word, axis)] = found.get((word, axis), 0) + sign
    return found


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _sentence_start(text: str, pos: int) -> bool:
    while pos > 0 and text[pos - 1] in _OPENERS:
        pos -= 1
    return pos == 0 or text[pos - 1] in ".!?:;\n"


def _terms(text: str) -> tuple[set[str], set[str]]:
    """Return (named terms, every word form a named term of the other message may match)."""
    text = _normalise(text)
    found = [(m.group(), _sentence_start(text, m.start())) for m in _TERM.finditer(text)]
    # Shouting, or Title Case (capitalised small words: "How To Boil An Egg"), says nothing
    # about names through its capitals.
    shouting = len(found) >= 3 and 2 * sum(len(t) > 1 and t.isupper() for t, _ in found) > len(found)
    title_case = sum(t[0].isupper() and not start and t.lower() in _STOPWORDS["en"]
                     and t.lower() not in _COMMON_CAPS for t, start in found) >= 2
    named = {_VOCAB[c] for c in text if c in "$€£¥"}
    words = set(named)
    for term, start in found:
        term = re.sub(r"'s$", "", term, flags=re.IGNORECASE)
        lower = term.lower()
        variants = {lower} if lower in _VOCAB else {lower, *filter(None, _PARTS.split(lower))}
        words |= {_singular(_VOCAB.get(v, v)) for v in variants}
        named |= {_VOCAB[v] for v in variants if v in _VOCAB}
        # Units of measure are the numbers guard's concern ("Fahrenheit" = "°F").
        if lower in _COMMON_CAPS or lower in _UNITS:
            continue
        if any(c.isdigit() for c in term) or re.search(r"[a-z][A-Z]", term) or (
                not shouting and (sum(c.isupper() for c in term) >= 2 and term.upper() == term
                                  or not (title_case or start) and term[0].isupper())):
            named.add(_VOCAB.get(lower, lower))
    return named, words


def entities(text: str) -> frozenset[str]:
    """Return the named terms of `text`, lowercased and canonical ("golang" -> "go")."""
    return frozenset(_terms(text)[0])


def _entities_differ(a: str, b: str) -> bool:
    (named_a, words_a), (named_b, words_b) = _terms(a), _terms(b)
    return not ({_singular(t) for t in named_a} <= words_b
                and {_singular(t) for t in named_b} <= words_a)


def detect_language(text: str) -> str | None:
    """Return an ISO 639-1 code for `text`, or None when the evidence is thin or mixed."""
    letters = [c for c in _normalise(text) if c.isalpha()]
    scripts: dict[str, int] = {}
    for c in letters:
        name = unicodedata.name(c, "")
        script = next((s for s in _SCRIPTS if name.startswith(s)), "LATIN")
        scripts[script] = scripts.get(script, 0) + 1
    if not letters:
        return None
    script, count = max(scripts.items(), key=lambda item: item[1])
    if script != "LATIN":
        if "CJK" in scripts and ("HIRAGANA" in scripts or "KATAKANA" in scripts):
            return "ja"
        return _SCRIPTS[script] if count * 2 > len(letters) else None
    # Split elisions ("l'inflation", "sull'autunno") but not English contractions ("don't").
    tokens = []
    for token in _tokens(text):
        head, sep, tail = token.partition("'")
        tokens += [head + sep, tail] if sep and len(tail) >= 3 else [token]
    scores = {lang: sum(t in words for t in tokens) + sum(c in _MARKS.get(lang, "") for c in text.lower())
              for lang, words in _STOPWORDS.items()}
    (best, top), (_, runner_up) = sorted(scores.items(), key=lambda item: -item[1])[:2]
    return best if top >= 2 and top >= 2 * runner_up else None


def _language_differs(a: str, b: str) -> bool:
    lang_a, lang_b = detect_language(a), detect_language(b)
    return lang_a is not None and lang_b is not None and lang_a != lang_b


_GUARDS = (
    ("numbers", _numbers_differ),
    ("negation", _negation_differs),
    ("entities", _entities_differ),
    ("language", _language_differs),
)


def guard(a: str, b: str) -> str | None:
    """Return the name of the first guard that tells `a` from `b`, or None if none does.

    Symmetric and deterministic; None means only that no lexical check separates the two.
    """
    for name, differs in _GUARDS:
        if differs(a, b):
            return name
    return None
