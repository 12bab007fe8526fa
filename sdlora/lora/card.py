"""A LoRA's model card (README.md) as loaders read it: the front matter's base model, and the minimal card sdlora
writes beside the LoRAs it converts or makes up (sdlora.output.modelcard writes a training run's full card).

Front matter through huggingface_hub's `ModelCardData` (what the Hub parses), so `base_model` and tags are valid
YAML whatever they contain.
"""
from __future__ import annotations

from pathlib import Path

from ..io import write_text


def front_matter(**fields) -> str:
    from huggingface_hub import ModelCardData

    return f"---\n{ModelCardData(**fields).to_yaml()}\n---\n"


def write_minimal(folder: Path, base_model: str, title: str = "") -> Path:
    """A card that only names the base model, for LoRAs sdlora converts or makes up (so loaders find the base)."""
    path = Path(folder) / "README.md"
    write_text(path, front_matter(base_model=base_model, tags=["lora", "sdlora"]) + (f"# {title}\n" if title else ""))
    return path


def base_model_of(card: Path) -> str | None:
    """The `base_model` a card's front matter names (the first, if it lists several), else None."""
    return card_field(card, "base_model")


def card_field(card: Path, key: str) -> str | None:
    """A one-line value of a card's front matter (the first, if it lists several), else None."""
    from huggingface_hub import metadata_load

    try:
        meta = metadata_load(card) if Path(card).is_file() else None
    except Exception:  # noqa: BLE001 - an unreadable or malformed card only costs the hint
        return None
    value = (meta or {}).get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value).strip().splitlines()[0] if isinstance(value, (str, int, float)) and str(value).strip() else None
