"""Settings of what a run leaves besides the LoRA: checkpoints, logs, validation images, samples, the Hub."""
from __future__ import annotations

from dataclasses import dataclass

from .declare import setting
from .. import prompts


@dataclass(frozen=True, kw_only=True)
class OutputSettings:
    checkpointing_steps: int = setting(500, "save a checkpoint every N steps (--resume_from_checkpoint continues "
                                            "from one)")
    checkpoints_total_limit: int | None = setting(help="keep only the newest N checkpoints (default: all)")
    report_to: str = setting("tensorboard", "where the losses are logged",
                             choices=["tensorboard", "wandb", "none", "all"])
    validation_prompt: str | None = setting(help="a prompt to draw every --validation_epochs epochs while training")
    num_validation_images: int = setting(4, "images drawn per --validation_prompt round")
    validation_epochs: int = setting(1, "draw the --validation_prompt every N epochs")
    sample_prompts: tuple[prompts.SamplePrompt, ...] = ()  # resolved: read from sample_prompts_file
    sample_prompts_file: str | None = setting(
        help="text file, one prompt per line with kohya's options (--n negative, --w width, --h height, --s steps, "
             "--l guidance, --d seed); PNGs and a grid per round in output_dir/samples/. Without "
             "--sample_every_n_steps/--sample_every_n_epochs: one round at the end", flag="sample_prompts",
        metavar="FILE")
    sample_every_n_steps: int | None = setting(  # with neither cadence, one round at the end
        help="sample the --sample_prompts every N optimizer steps", metavar="N")
    sample_every_n_epochs: int | None = setting(
        help="sample the --sample_prompts every N epochs (with --sample_every_n_steps: at both)", metavar="N")
    sample_at_first: bool = setting(False, "also sample the --sample_prompts before training starts (in a new run: "
                                           "the untrained LoRA)")
    push_to_hub: bool = setting(False, "upload the LoRA, its kohya file and model card to the Hub at the end")
    hub_model_id: str | None = setting(help="the Hub repository to upload to (default: the --output_dir's name)")

