"""Answers from a model's free text, by each benchmark's published rule.

- `mme_yes_no`: MME's rule: the lower-cased answer if it is exactly "yes" / "no", else "yes" / "no" when that
  word occurs in its first four characters ("yes" checked first), else "other" (always wrong).
- `pope_yes_no`: POPE's rule: the first sentence (up to the first "."), commas removed, split into words;
  "no" when one of the words is "no", "No" or "not", else "yes".
- `option_letter`: MMBench's multiple choice: the option letter a free-text answer picks, or None when it
  picks none or several (*choice*, in the spirit of VLMEvalKit's exact matching, without its LLM judge):
  1. a letter alone or as a label at the start ("B", "B.", "(B)", "B)", "B:") -> that letter;
  2. else the option letters standing as words in the text (not the article "A" before a lower-case word):
     exactly one -> it;
  3. else the options whose text occurs in the answer (case-insensitive): exactly one -> it.
"""

from __future__ import annotations

import re
from typing import Mapping

YES, NO, OTHER = "yes", "no", "other"


def mme_yes_no(text: str) -> str:
    t = text.strip().lower()
    if t in (YES, NO):
        return t
    head = t[:4]
    if YES in head:
        return YES
    if NO in head:
        return NO
    return OTHER


def pope_yes_no(text: str) -> str:
    t = text.strip()
    if "." in t:
        t = t.split(".")[0]
    words = t.replace(",", " ").split()
    return NO if any(w in ("No", "not", "no") for w in words) else YES


_LABEL = re.compile(r"^\(?([A-Z])\s*(?:[.):]|$)")


def option_letter(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter (a key of `options`) that `text` picks, or None (see the module docstring)."""
    t = text.strip()
    m = _LABEL.match(t)
    if m and m.group(1) in options:
        return m.group(1)
    found = []
    for letter in options:
        for w in re.finditer(rf"(?<![A-Za-z]){letter}(?![A-Za-z])", t):
            article = letter == "A" and re.match(r"\s+[a-z]", t[w.end():]) is not None
            found.append((letter, article))
    letters = {x for x, article in found if not article}
    if len(letters) == 1:
        return letters.pop()
    low = t.lower()
    hits = [k for k, v in options.items() if str(v).strip() and str(v).strip().lower() in low]
    return hits[0] if len(hits) == 1 else None
