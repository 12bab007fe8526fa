"""The facts a finished run records about itself (`RunSummary`), and where each one is written: its row label in
the model card's settings table and its keys in the LoRA files' safetensors header.

A fact that is a training setting says so (`fact(setting="rank")`) and takes its label and keys from that
setting's declaration (the card=/header= tags of its field in sdlora/training/config/); the other facts declare
theirs here. A tagged setting no fact names needs no line here: it is recorded as it was set (`settings`), after
the facts, and left out while None, False or at its declared default (so a new tag changes no earlier
run's card or header). The card (modelcard.py) and the header (weights.py) iterate these
declarations, in this order, and format a value only where it needs more than `str`; training/summary.py fills a
RunSummary at the end of a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..training.config import default_of, fields_tagged, tags_of


def fact(card: str | None = None, header: str | tuple = (), setting: str | None = None):
    """A fact's field: its card label and header keys, or the setting whose declaration holds them."""
    return field(metadata={"card": card, "header": header, "setting": setting})


@dataclass
class RunSummary:
    """The facts of a finished run, in the card's row order (a None value leaves its row and keys out)."""
    base_model: str = fact(setting="base_name")  # a Hub id, or a local folder's name when pushing (never a path)
    # a single-file base's hashes as A1111/Civitai match a LoRA to its base (bases.hashes; kohya's keys)
    base_sha256: str | None = fact(card="base model sha256", header="ss_new_sd_model_hash")
    base_legacy_hash: str | None = fact(header="ss_sd_model_hash")
    family: str = fact(card="base model family")
    kind: str = fact(card="kind", header="ss_training_comment")  # "text-to-image" or "dreambooth"
    rank: int = fact(setting="rank")  # rank and alpha as the file records them (inject.file_rank_alpha)
    alpha: float = fact(setting="lora_alpha")
    lora_type: str = fact(setting="lora_type")
    rslora: bool | None = fact(setting="use_rslora")
    init: str | None = fact(setting="init_lora_weights")  # a non-default --init_lora_weights
    target_modules: list = fact(setting="target_modules")
    train_text_encoder: bool = fact(setting="train_text_encoder")
    steps: int = fact(card="steps", header="ss_steps")
    epochs: int = fact(card="epochs", header="ss_epoch")
    train_batch_size: int = fact(setting="train_batch_size")
    gradient_accumulation_steps: int = fact(setting="gradient_accumulation_steps")
    learning_rate: float = fact(setting="learning_rate")
    lr_scheduler: str = fact(setting="lr_scheduler")
    resolution: int = fact(setting="resolution")
    mixed_precision: str = fact(setting="mixed_precision")
    save_precision: str = fact(setting="save_precision")
    dataset: str = fact(card="dataset")
    num_images: int = fact(card="training images", header="ss_num_train_images")
    seed: int = fact(setting="seed")
    buckets: str | None = fact(card="aspect-ratio buckets")
    masked_loss: bool | None = fact(setting="masked_loss")
    caption_ops: str | None = fact(card="caption operations")
    repeat_folders: str | None = fact(card="repeat folders")
    best_val_loss: str | None = fact(card="lowest validation loss")
    vae: str | None = fact(setting="pretrained_vae_model_name_or_path")
    zero_terminal_snr: bool | None = fact(setting="zero_terminal_snr")
    quantize_base: str | None = fact(setting="quantize_base")
    # header only
    dataset_dirs: dict | None = fact(header="ss_dataset_dirs")
    architecture: str = fact(header=("ss_base_model_version", "ss_v2", "modelspec.architecture"))
    prediction_type: str = fact(header="modelspec.prediction_type")
    title: str = fact(header="modelspec.title")
    trigger_phrase: str | None = fact(header="modelspec.trigger_phrase")
    extra_tags: list = fact(header="modelspec.tags")
    # the card's own: its front matter, its usage snippet, its samples
    base_model_in_front_matter: bool = fact()
    base_is_local: bool = fact()
    samples: list = fact()  # [{"prompt", "path"}] of the latest validation images
    repo_id: str | None = fact()
    example_prompt: str | None = fact()
    kohya_file: str = fact()
    license: str = fact()  # the base model's (a LoRA is a derivative of it): summary.base_license
    settings: dict = field(default_factory=dict)  # {name: value} of the tagged settings no fact names (own_settings)

    def facts(self) -> dict:
        """The summary as the {name: value} the model card and the header take."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "settings"}
        return values | {k: v for k, v in self.settings.items() if v is not None and v is not False
                         and v != default_of(k)}


def own_settings() -> list[str]:
    """The settings with a card= or header= tag that no fact names, in declaration order."""
    named = {f.metadata.get("setting") for f in fields(RunSummary)}
    return [n for n in fields_tagged("card") | fields_tagged("header") if n not in named]


def _declared(f, tag: str):
    meta = f.metadata
    return tags_of(meta["setting"]).get(tag) if meta["setting"] else meta[tag]


def card_labels() -> dict[str, str]:
    """{fact: its row label in the card's settings table}, in the table's order."""
    labels = {f.name: label for f in fields(RunSummary) if "card" in f.metadata and (label := _declared(f, "card"))}
    return labels | {n: label for n in own_settings() if (label := fields_tagged("card").get(n))}


def header_keys() -> dict[str, tuple[str, ...]]:
    """{fact: the safetensors header keys it is written under}."""
    keys = {f.name: _declared(f, "header") or () for f in fields(RunSummary) if "header" in f.metadata}
    keys |= {n: fields_tagged("header").get(n) or () for n in own_settings()}
    return {name: (k,) if isinstance(k, str) else tuple(k) for name, k in keys.items() if k}
