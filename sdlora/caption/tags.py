"""Captions as tag lists: split and join them, put a trigger word before and after, merge new tags into a caption,
bulk-edit and count them (the tagger's summary and the UI's Dataset tab)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

SEPARATOR = ", "  # what joins the tags sdlora writes (kohya's taggers write the same)


def split_tags(text: str, separator: str = ",") -> list[str]:
    """The caption's tags, stripped, empty ones left out (as kohya's trainers split them)."""
    return [t.strip() for t in text.split(separator.strip() or separator) if t.strip()]


def join_tags(tags: Iterable[str], separator: str = SEPARATOR) -> str:
    return separator.join(t for t in tags if t)


def compose(caption: str, prefix: str = "", suffix: str = "", separator: str = SEPARATOR) -> str:
    """prefix, caption, suffix joined by the separator; an empty part is left out."""
    return join_tags((prefix.strip(), caption.strip(), suffix.strip()), separator)


def merged(existing: str, new: str, separator: str = SEPARATOR) -> str:
    """--append: the existing caption, then each tag of `new` that it does not have yet."""
    have = split_tags(existing, separator)
    seen = set(have)
    extra = [t for t in split_tags(new, separator) if not (t in seen or seen.add(t))]
    return join_tags(have + extra, separator)


def edit(text: str, add: Iterable[str] = (), remove: Iterable[str] = (), replace: dict[str, str] | None = None,
         separator: str = SEPARATOR) -> str:
    """A caption with tags replaced (old -> new), removed, then added at the end where missing; the order of the
    others is kept, and a tag that a replacement duplicates is kept once."""
    replace, gone = replace or {}, set(remove)
    out: list[str] = []
    for tag in split_tags(text, separator) + list(add):
        tag = replace.get(tag, tag).strip()
        if tag and tag not in gone and tag not in out:
            out.append(tag)
    return join_tags(out, separator)


def frequency(captions: Iterable[str], separator: str = ",") -> Counter:
    """How many captions each tag is in."""
    return Counter(t for text in captions for t in set(split_tags(text, separator)))


def no_underscores(tag: str) -> str:
    """kohya's --remove_underscore: underscores become spaces in tags longer than 3 characters, so that emoticon
    tags such as ^_^ stay as they are."""
    return tag.replace("_", " ") if len(tag) > 3 else tag
